"""The DCGAN generator and discriminator (TensorFlow's DCGAN tutorial), unconditional and class-conditional.

Builders are pure functions: they create fresh Keras models and touch no global state (the Keras
mixed-precision policy in force when they are called picks the compute dtype; outputs stay float32).

Shapes and ranges:
- generator: `noise` float32 [B, latent_dim] (standard normal) and, when conditional, `digit`
  int32 [B] in 0..9 → images float32 [B, 28, 28, 1] in [-1, 1] (tanh, or hard_tanh: a clip).
- discriminator: `image` float32 [B, 28, 28, 1] in [-1, 1] and, when conditional, `digit` int32 [B]
  → one logit float32 [B, 1] (real > 0 > fake); with the auxiliary classifier head also the
  digit's logits float32 [B, 10] (a list [logit, class_logits]).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)


class ReplicaDropout(keras.layers.Layer):
    """Dropout whose mask differs on every replica, drawn from checkpointable random state.

    Keras 3's `Dropout` draws its seeds from a `SeedGenerator`, which under MirroredStrategy gives
    every replica the same mask (keras-team/keras#20611). This layer draws from a `SeedGenerator`
    too, so its state is a variable a checkpoint holds (a resumed run draws the masks an
    uninterrupted one would), and folds the replica id into the seed, so replicas differ.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.random.experimental.stateless_fold_in(tf.cast(self.seed_generator.next(), tf.int64), replica)
        return tf.nn.experimental.stateless_dropout(inputs, rate=self.rate, seed=seed)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def _spectrally_normalized(layer: keras.layers.Layer, kernel, training: bool):
    """`kernel` / σ(kernel), σ estimated by one power iteration from `layer.spectral_u` (updated when training).

    The iteration runs in float32 on the kernel seen as [inputs, outputs]; only σ carries gradients (as in
    Miyato et al.). Every replica computes the same u from the same kernel, so its copies stay equal.
    """
    matrix = tf.reshape(tf.cast(kernel, tf.float32), [-1, kernel.shape[-1]])
    u = tf.cast(layer.spectral_u, tf.float32)  # [1, outputs]
    v = tf.math.l2_normalize(tf.matmul(u, matrix, transpose_b=True))  # [1, inputs]
    u = tf.stop_gradient(tf.math.l2_normalize(tf.matmul(v, matrix)))
    v = tf.stop_gradient(v)
    sigma = tf.reshape(tf.matmul(tf.matmul(v, matrix), u, transpose_b=True), [])
    if training:
        layer.spectral_u.assign(u)
    return kernel / tf.cast(sigma, kernel.dtype)


def _add_spectral_u(layer: keras.layers.Layer, outputs: int) -> None:
    layer.spectral_u = layer.add_weight(shape=(1, outputs), initializer=keras.initializers.RandomNormal(),
                                        trainable=False, name="spectral_u", dtype="float32")


class SpectralConv2D(keras.layers.Conv2D):
    """Conv2D whose kernel is divided by its largest singular value (spectral normalisation, Miyato et al. 2018)."""

    def build(self, input_shape):
        super().build(input_shape)
        _add_spectral_u(self, self.filters)

    def call(self, inputs, training=False):
        outputs = self.convolution_op(inputs, _spectrally_normalized(self, self.kernel, training))
        return outputs + tf.reshape(self.bias, (1, 1, 1, self.filters)) if self.use_bias else outputs


class SpectralDense(keras.layers.Dense):
    """Dense whose kernel is divided by its largest singular value (spectral normalisation)."""

    def build(self, input_shape):
        super().build(input_shape)
        _add_spectral_u(self, self.units)

    def call(self, inputs, training=False):
        outputs = tf.matmul(inputs, _spectrally_normalized(self, self.kernel, training))
        return outputs + self.bias if self.use_bias else outputs


class MinibatchStd(keras.layers.Layer):
    """Appends one feature map: the batch's standard deviation (ProGAN, Karras et al. 2018).

    features [B, H, W, C] → [B, H, W, C + 1]. The batch is split into groups of `group_size` (the whole
    batch when B does not divide by it); the new map of each image is the mean over positions and
    channels of the std over its group. Computed in float32 and on each replica's own images.
    """

    def __init__(self, group_size: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.group_size = group_size

    def call(self, features):
        values = tf.cast(features, tf.float32)
        batch = tf.shape(values)[0]
        groups = tf.where(batch % self.group_size == 0, tf.minimum(self.group_size, batch), batch)
        grouped = tf.reshape(values, tf.concat([[groups, -1], tf.shape(values)[1:]], 0))  # [G, B/G, H, W, C]
        std = tf.sqrt(tf.math.reduce_variance(grouped, axis=0) + 1e-8)  # [B/G, H, W, C]
        per_image = tf.tile(tf.reduce_mean(std, axis=[1, 2, 3]), [groups])  # image i = g * B/G + m gets m's
        maps = per_image[:, None, None, None] * tf.ones_like(values[..., :1])
        return tf.concat([features, tf.cast(maps, features.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1)

    def get_config(self):
        return {**super().get_config(), "group_size": self.group_size}


class DigitScaleShift(keras.layers.Layer):
    """The scale and shift of a conditional BatchNorm: features * (1 + gamma[digit]) + beta[digit].

    Follows a BatchNormalization without its own scale and centre. features [B, ..., C] (any float
    dtype), digits int32 [B]; gamma and beta start at zero, so the layer starts as plain BatchNorm.
    """

    def build(self, input_shapes):
        features_shape, _ = input_shapes
        channels = int(features_shape[-1])
        self.gamma = keras.layers.Embedding(NUM_CLASSES, channels, embeddings_initializer="zeros",
                                            dtype=self.dtype_policy, name="gamma")
        self.beta = keras.layers.Embedding(NUM_CLASSES, channels, embeddings_initializer="zeros",
                                           dtype=self.dtype_policy, name="beta")
        self.gamma.build((None,))
        self.beta.build((None,))

    def call(self, inputs):
        features, digits = inputs
        # [B, C] → [B, 1, 1, C] for feature maps, so each image's digit scales all its positions.
        broadcast_shape = [-1] + [1] * (len(features.shape) - 2) + [features.shape[-1]]
        gamma = tf.reshape(self.gamma(digits), broadcast_shape)
        beta = tf.reshape(self.beta(digits), broadcast_shape)
        return features * (1.0 + gamma) + beta


class ProjectionLogit(keras.layers.Layer):
    """Class-conditional logit of a projection discriminator (Miyato & Koyama, 2018).

    logit = w·h + b + embed(digit)·h: the label enters as an inner product with the features, which
    trains faster and more stably than concatenating one-hot maps to the image.
    """

    def __init__(self, spectral_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.spectral_norm = spectral_norm

    def build(self, input_shapes):
        features_shape, _ = input_shapes
        width = int(features_shape[-1])
        dense = SpectralDense if self.spectral_norm else keras.layers.Dense
        self.linear = dense(1, dtype=self.dtype_policy, name="linear")
        self.linear.build(features_shape)
        self.class_embedding = keras.layers.Embedding(NUM_CLASSES, width, dtype=self.dtype_policy, name="class_embedding")
        self.class_embedding.build((None,))

    def call(self, inputs, training=False):
        features, digits = inputs
        projection = tf.reduce_sum(self.class_embedding(digits) * features, axis=-1, keepdims=True)
        return self.linear(features, training=training) + projection

    def get_config(self):
        return {**super().get_config(), "spectral_norm": self.spectral_norm}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Layer widths, kernel size and label path of a DCGAN pair (both end at 28x28x1 images / one logit)."""

    projected_channels: int  # G: Dense → 7x7xC
    upsampling: tuple[tuple[int, int], ...]  # G: (filters, stride) of each Conv2DTranspose before the image layer
    downsampling: tuple[int, ...]  # D: filters of each stride-2 Conv2D
    kernel_size: int
    digit_batch_norm: bool = False  # conditional G: each upsampling BatchNorm's scale and shift depend on the digit
    pixel_kernel_size: int | None = None  # G's image layer and D's first convolution (None: kernel_size)
    upsampling_kernel_size: int | None = None  # G's stride-2 blocks before the image layer (None: kernel_size)

    @property
    def pixel_kernel(self) -> int:
        return self.pixel_kernel_size or self.kernel_size


IMAGE_ACTIVATIONS = ("tanh", "hard_tanh")  # Keras activations that end in [-1, 1]

ARCHITECTURES = {
    # The TensorFlow DCGAN tutorial's models (5x5 kernels, 7x7x256 projection): ~51M multiply-adds per G call.
    "tutorial": Architecture(256, ((128, 1), (64, 2)), (64, 128), 5),
    # The same family at a fraction of the cost (4x4 kernels, one upsampling block, ~7M multiply-adds
    # per G call): more images per second, so more passes over MNIST in the same time (docs/experiments.md).
    "compact": Architecture(128, ((64, 2),), (64, 128), 4),
    # The tutorial's widths with conditional BatchNorm in G (de Vries et al. 2017; BigGAN): the digit
    # also sets the scale and shift after each upsampling block, a stronger label path than the
    # one-hot at the input alone. Unconditional generators ignore it.
    "tutorial_cbn": Architecture(256, ((128, 1), (64, 2)), (64, 128), 5, digit_batch_norm=True),
    # tutorial_cbn with 3x3 kernels in G and D: G's transposed convolutions, most of the step's work,
    # need about a third of the multiply-adds (the recipe tanh_default; its speed: docs/experiments.md).
    "tutorial_cbn_3x3": Architecture(256, ((128, 1), (64, 2)), (64, 128), 3, digit_batch_norm=True),
    # tutorial_cbn_3x3 with D twice as wide (128, 256): a stronger critic, at about four times D's
    # multiply-adds, which D spends on both batches and on G's backward pass (slower per step).
    "tutorial_cbn_3x3_wide_d": Architecture(256, ((128, 1), (64, 2)), (128, 256), 3, digit_batch_norm=True),
    # tutorial_cbn_3x3 with 5x5 kernels in the two layers that touch pixels, G's image layer and D's
    # first convolution: each has one image channel, so together they add a few percent of the work
    # (the default).
    "tutorial_cbn_3x3_5x5_pixels": Architecture(256, ((128, 1), (64, 2)), (64, 128), 3, digit_batch_norm=True,
                                                pixel_kernel_size=5),
    # The default (tutorial_cbn_3x3_5x5_pixels) with G half as wide again (384, 192, 96 channels; D
    # unchanged): more room for G to draw varied styles, at about 2.25 times G's multiply-adds.
    "tutorial_cbn_3x3_5x5_pixels_wide_g": Architecture(384, ((192, 1), (96, 2)), (64, 128), 3, digit_batch_norm=True,
                                                       pixel_kernel_size=5),
    # tutorial_cbn_3x3 with 4x4 kernels wherever G doubles the resolution and in D's first convolution:
    # a kernel the stride divides covers every output pixel equally, so no checkerboard of stronger and
    # weaker pixels (Odena et al. 2016), for about a seventh more of G's multiply-adds.
    "tutorial_cbn_3x3_4x4_up": Architecture(256, ((128, 1), (64, 2)), (64, 128), 3, digit_batch_norm=True,
                                            pixel_kernel_size=4, upsampling_kernel_size=4),
}


def build_generator_of(config, synchronized_batch_norm: bool = False) -> keras.Model:
    """The generator a training config describes: `build_generator` with its latent_dim, conditional,
    architecture and image_activation (`trainer.config.TrainConfig`, or anything with those fields)."""
    return build_generator(config.latent_dim, config.conditional, synchronized_batch_norm=synchronized_batch_norm,
                           architecture=config.architecture, image_activation=config.image_activation)


def build_generator(latent_dim: int = 100, conditional: bool = True, synchronized_batch_norm: bool = False,
                    architecture: str = "tutorial", image_activation: str = "tanh") -> keras.Model:
    """DCGAN generator: Dense 7x7xC → Conv2DTranspose blocks → 1 channel at 28x28, BatchNorm, LeakyReLU, tanh or a clip.

    Inputs noise float32 [B, latent_dim] (and digit int32 [B] in 0..9 when conditional); output
    images float32 [B, 28, 28, 1] in [-1, 1]. The conditional generator concatenates a one-hot digit
    to the noise (and, for architectures with `digit_batch_norm`, also conditions each upsampling
    block's BatchNorm on it: `DigitScaleShift`). Pass `synchronized_batch_norm=True` when training
    over several replicas (see `_normalize_and_activate`). `architecture` names an entry of ARCHITECTURES;
    `image_activation` is "tanh" or "hard_tanh" (clip to [-1, 1]: exact blank and full-ink pixels).
    """
    spec = _architecture(architecture)
    if image_activation not in IMAGE_ACTIVATIONS:
        raise ValueError(f"image_activation must be one of {', '.join(IMAGE_ACTIVATIONS)}, got {image_activation!r}")
    noise = keras.Input((latent_dim,), name="noise")
    inputs = [noise]
    hidden = noise
    digit = None
    if conditional:
        digit = keras.Input((), dtype="int32", name="digit")
        inputs.append(digit)
        one_hot = keras.ops.one_hot(digit, NUM_CLASSES, dtype=noise.dtype)
        hidden = keras.layers.Concatenate(name="noise_and_digit")([noise, one_hot])
    hidden = keras.layers.Dense(7 * 7 * spec.projected_channels, use_bias=False, name="project")(hidden)
    hidden = _normalize_and_activate(hidden, "project", synchronized_batch_norm)
    hidden = keras.layers.Reshape((7, 7, spec.projected_channels))(hidden)
    norm_digit = digit if spec.digit_batch_norm else None  # None: plain BatchNorm
    for index, (filters, strides) in enumerate(spec.upsampling, start=1):
        kernel_size = (spec.upsampling_kernel_size or spec.kernel_size) if strides == 2 else spec.kernel_size
        hidden = keras.layers.Conv2DTranspose(filters, kernel_size, strides=strides, padding="same",
                                              use_bias=False, name=f"up{index}")(hidden)
        hidden = _normalize_and_activate(hidden, f"up{index}", synchronized_batch_norm, norm_digit)
    logits = keras.layers.Conv2DTranspose(1, spec.pixel_kernel, strides=2, padding="same", use_bias=False,
                                          name="to_image")(hidden)
    # In float32 so mixed-precision runs still produce float32 images.
    images = keras.layers.Activation(image_activation, dtype="float32", name="images")(logits)
    return keras.Model(inputs, images, name="generator")


def build_discriminator(conditional: bool = True, per_replica_dropout: bool = False,
                        architecture: str = "tutorial", classifier_head: bool = False,
                        dropout: float = 0.3, spectral_norm: bool = False, minibatch_std: bool = False,
                        twin_classifier_head: bool = False) -> keras.Model:
    """DCGAN discriminator: Conv2D 64 / 128 (stride 2), LeakyReLU, Dropout, Dense → 1 logit (projection when conditional).

    Inputs image float32 [B, 28, 28, 1] in [-1, 1] (and digit int32 [B] when conditional); output
    one logit float32 [B, 1]. `classifier_head=True` (conditional only) adds AC-GAN's auxiliary
    classifier: the outputs become [logit, class_logits float32 [B, 10]], both from the same features.
    `twin_classifier_head=True` (with the classifier head) adds TAC-GAN's twin, which learns to name the
    fakes' digits: [logit, class_logits, twin_class_logits float32 [B, 10]].

    `dropout` is the rate after each convolution (the tutorial's 0.3); 0 builds no dropout layers.
    Pass `per_replica_dropout=True` when training over several replicas: Keras's Dropout would give
    every replica the same mask. On one device Keras's Dropout is kept, as its stateless kernel was
    faster than the stateful `tf.nn.dropout` (docs/experiments.md).

    `spectral_norm` spectrally normalises every convolution and dense kernel (not the projection's class
    embedding); `minibatch_std` appends a `MinibatchStd` feature map to the last convolution's output.
    """
    spec = _architecture(architecture)
    convolution = SpectralConv2D if spectral_norm else keras.layers.Conv2D
    dense = SpectralDense if spectral_norm else keras.layers.Dense
    image = keras.Input(IMAGE_SHAPE, name="image")
    inputs = [image]
    hidden = image
    for index, filters in enumerate(spec.downsampling, start=1):
        name = f"down{index}"
        kernel_size = spec.pixel_kernel if index == 1 else spec.kernel_size
        hidden = convolution(filters, kernel_size, strides=2, padding="same", name=name)(hidden)
        hidden = keras.layers.LeakyReLU(negative_slope=0.2, name=f"{name}_relu")(hidden)
        if dropout:
            dropout_layer = ReplicaDropout if per_replica_dropout else keras.layers.Dropout
            hidden = dropout_layer(dropout, name=f"{name}_dropout")(hidden)
    if minibatch_std:
        hidden = MinibatchStd(name="minibatch_std")(hidden)
    features = keras.layers.Flatten(name="features")(hidden)
    if conditional:
        digit = keras.Input((), dtype="int32", name="digit")
        inputs.append(digit)
        logit = ProjectionLogit(spectral_norm=spectral_norm, dtype="float32", name="logit")([features, digit])
    else:
        logit = dense(1, dtype="float32", name="logit")(features)
    if classifier_head:
        if not conditional:
            raise ValueError("classifier_head needs a conditional discriminator (there is no digit to classify)")
        outputs = [logit, dense(NUM_CLASSES, dtype="float32", name="class_logits")(features)]
        if twin_classifier_head:
            outputs.append(dense(NUM_CLASSES, dtype="float32", name="twin_class_logits")(features))
        return keras.Model(inputs, outputs, name="discriminator")
    if twin_classifier_head:
        raise ValueError("twin_classifier_head needs the classifier head (classifier_head=True)")
    return keras.Model(inputs, logit, name="discriminator")


def _architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def _normalize_and_activate(hidden, name: str, synchronized: bool, digit=None):
    # Synchronized BatchNorm: batch statistics are all-reduced over the replicas. Keras 3 keeps the
    # moving mean/variance in MirroredVariables with aggregation NONE and lets each replica assign
    # its own local statistics, so unsynchronized BN leaves the copies silently different (and the
    # checkpoint keeps replica 0's). With synchronized statistics every replica computes the same
    # update; the cost is one small all-reduce per BN layer. The variables are the same either way,
    # so checkpoints load into both variants.
    # With a digit, BatchNorm's own scale and centre give way to the digit's (DigitScaleShift).
    conditioned = digit is not None
    hidden = keras.layers.BatchNormalization(synchronized=synchronized, center=not conditioned, scale=not conditioned,
                                             name=f"{name}_norm")(hidden)
    if conditioned:
        hidden = DigitScaleShift(name=f"{name}_digit_scale_shift")([hidden, digit])
    return keras.layers.LeakyReLU(negative_slope=0.2, name=f"{name}_relu")(hidden)


def generator_inputs(noise, digits, conditional: bool):
    """The generator's call arguments for a batch: [noise, digits] when conditional, else noise."""
    return [noise, digits] if conditional else noise


def discriminator_inputs(images, digits, conditional: bool):
    """The discriminator's call arguments for a batch: [images, digits] when conditional, else images."""
    return [images, digits] if conditional else images
