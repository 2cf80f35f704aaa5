"""The training state and the compiled, distributed GAN step.

`set_globals_and_build_state` sets the process-wide Keras precision policy and random seeds, then
creates everything that has variables under `strategy.scope()`;
`replica_step` is one tutorial-style update of D and G on one replica's slice of the batch;
`make_train_function` compiles `steps` of them into one `tf.function` call over a distributed
iterator, so Python runs once per call, not once per step.
"""
from __future__ import annotations

import dataclasses
import functools

import keras
import tensorflow as tf

from mnist_data import acquire
from trainer import data, losses, models, strategy as strategy_lib
from trainer.config import TrainConfig


@dataclasses.dataclass
class GanState:
    """Everything a checkpoint holds: both models, both optimizers, the step and all random state."""

    generator: keras.Model
    discriminator: keras.Model
    generator_optimizer: keras.optimizers.Optimizer
    discriminator_optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    noise_generator: tf.random.Generator
    generator_average: keras.Model | None = None  # the exponential moving average of G (what is exported)

    @property
    def sampling_generator(self) -> keras.Model:
        """The generator to draw samples from: the moving average when the run keeps one."""
        return self.generator_average if self.generator_average is not None else self.generator

    def checkpoint(self) -> tf.train.Checkpoint:
        # The dropout layers' seed states are not among the models' weights, so tf.train.Checkpoint
        # would skip them; without them a resumed run draws other dropout masks than an
        # uninterrupted one and resuming is no longer exact.
        return tf.train.Checkpoint(generator=self.generator, discriminator=self.discriminator,
                                   generator_optimizer=self.generator_optimizer,
                                   discriminator_optimizer=self.discriminator_optimizer,
                                   step=self.step, noise_generator=self.noise_generator,
                                   seed_states=seed_states(self.generator) + seed_states(self.discriminator),
                                   **({"generator_average": self.generator_average} if self.generator_average is not None else {}))

    def non_finite_variables(self) -> list[str]:
        """Paths of the trained variables (weights, BatchNorm statistics, optimizer slots) holding NaN or inf."""
        variables = [*self.generator.weights, *self.discriminator.weights,
                     *self.generator_optimizer.variables, *self.discriminator_optimizer.variables,
                     *(self.generator_average.weights if self.generator_average is not None else [])]
        return [variable.path for variable in variables if not _all_finite(variable)]


def _all_finite(variable) -> bool:
    return not keras.backend.is_float_dtype(variable.dtype) or bool(tf.reduce_all(tf.math.is_finite(variable.value)))


def seed_states(model: keras.Model) -> list:
    """The model's random-seed state variables (Keras counts them in `variables`, not in `weights`)."""
    weight_ids = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weight_ids]


def set_globals_and_build_state(config: TrainConfig, strategy: tf.distribute.Strategy) -> GanState:
    """Models, optimizers, step counter and RNG, all created in `strategy.scope()`.

    Sets two process-wide things first and leaves them set: Keras's global mixed-precision policy
    (the run's resolved `config.precision`) and the Python, NumPy and TensorFlow seeds
    (`config.seed`). Code that must build float32 models afterwards in the same process scopes
    the policy with `common.precision.float32_policy()` (exports and the judge do).
    """
    keras.mixed_precision.set_global_policy(strategy_lib.resolve_precision(config.precision, strategy))
    keras.utils.set_random_seed(config.seed)  # the initial weights depend on the seed only
    with strategy.scope():
        several_replicas = strategy.num_replicas_in_sync > 1
        generator = models.build_generator_of(config, synchronized_batch_norm=several_replicas)
        discriminator = models.build_discriminator(config.conditional, per_replica_dropout=several_replicas,
                                                   architecture=config.architecture,
                                                   classifier_head=config.classifier_weight > 0,
                                                   twin_classifier_head=config.twin_classifier > 0,
                                                   dropout=config.discriminator_dropout,
                                                   spectral_norm=config.spectral_norm, minibatch_std=config.minibatch_std)
        generator_optimizer = _adam(config, config.learning_rate)
        discriminator_optimizer = _adam(config, config.discriminator_learning_rate or config.learning_rate)
        # Optimizers must be built before the first distributed step, or the first
        # apply_gradients inside strategy.run fails (Keras 3 creates slots lazily).
        generator_optimizer.build(generator.trainable_variables)
        discriminator_optimizer.build(discriminator.trainable_variables)
        # A Generator created in the scope gives each replica its own stream, so replicas draw
        # different noise (Keras SeedGenerator noise would be identical on every replica).
        noise_generator = tf.random.Generator.from_seed(config.seed)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        generator_average = None
        if config.generator_average_decay > 0:
            generator_average = models.build_generator_of(config)
            generator_average.set_weights(generator.get_weights())
    return GanState(generator, discriminator, generator_optimizer, discriminator_optimizer, step, noise_generator,
                    generator_average)


def update_generator_average(state: GanState, decay: float, rampup: float = 0.0, interval: int = 1) -> None:
    """average <- d * average + (1 - d) * G over all of G's weights (BatchNorm statistics included).

    Runs in cross-replica context after a step: G's copies are identical on every replica, so
    one update written to every copy keeps the average mirrored. The decay ramps up towards `decay`,
    so the early average does not cling to the random initial weights: as (1 + step) / (10 + step),
    or with `rampup` > 0 as a half-life of `rampup` x step steps, d = 0.5 ** (1 / (rampup x step)).
    Called every `interval` steps instead of every step, d is raised to the power `interval`.
    """
    step = tf.cast(state.step, tf.float32)
    if rampup > 0:
        ramp = tf.pow(0.5, 1.0 / tf.maximum(rampup * step, 1e-3))
    else:
        ramp = (1.0 + step) / (10.0 + step)
    effective = tf.pow(tf.minimum(decay, ramp), float(interval))
    for average, current in zip(state.generator_average.weights, state.generator.weights):
        average.assign(effective * average + (1.0 - effective) * tf.cast(current, average.dtype))


def _adam(config: TrainConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.Adam(learning_rate_schedule(config, learning_rate), beta_1=config.beta_1,
                                      beta_2=config.beta_2)
    if config.precision == "mixed_float16":
        # float16 gradients underflow without loss scaling; the wrapper scales the loss and
        # unscales (and skips non-finite) gradients inside apply_gradients.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def learning_rate_schedule(config: TrainConfig, learning_rate: float):
    """`learning_rate` as a constant, or as `config.learning_rate_schedule` over the run's planned steps.

    The schedule reads the optimizer's own step count, which the checkpoint holds, so a resumed run
    continues on the same curve. It spans `epochs` (not `max_steps`, which only cuts a run short).
    """
    if config.learning_rate_schedule == "constant":
        return learning_rate
    total_steps = planned_steps(config)
    hold_steps = int(total_steps * config.learning_rate_decay_start)
    return HoldThenLinearDecay(learning_rate, hold_steps=hold_steps, total_steps=total_steps)


def planned_steps(config: TrainConfig) -> int:
    """The steps of all `epochs` (what the schedules span; `max_steps` only cuts a run short)."""
    return config.epochs * data.steps_per_epoch(acquire.TRAIN_SIZE, config.batch_size)


@keras.saving.register_keras_serializable(package="digitgan")
class HoldThenLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`initial` for the first `hold_steps` steps, then linearly down to 0 at `total_steps`."""

    def __init__(self, initial: float, hold_steps: int, total_steps: int):
        self.initial, self.hold_steps, self.total_steps = initial, hold_steps, total_steps

    def __call__(self, step):
        decay_steps = max(self.total_steps - self.hold_steps, 1)
        past_hold = tf.maximum(tf.cast(step, tf.float32) - self.hold_steps, 0.0)
        return self.initial * tf.maximum(1.0 - past_hold / decay_steps, 0.0)

    def get_config(self):
        return {"initial": self.initial, "hold_steps": self.hold_steps, "total_steps": self.total_steps}


def replica_step(state: GanState, images, digits, latent_dim: int, gradients_function, r1_interval: int = 1,
                 paired_digits: bool = False, shift_pixels: int = 0):
    """One D and G update on this replica's batch. Returns (generator_loss, discriminator_loss).

    images uint8 [b, 28, 28, 1] (MNIST pixels); digits int32 [b]; b = this replica's share of the batch.
    `gradients_function(images, digits, noise, fake_digits, regularize)` is `losses_and_gradients` with
    the run's settings bound (make_train_function builds it, XLA-compiled when `config.xla`);
    `regularize` says whether this step adds the lazy R1 penalty (every `r1_interval` steps).
    With `paired_digits` the fakes' second half asks for the first half's digits (`losses.paired_halves`).
    With `shift_pixels` > 0 each real and fake image also gets a random move of up to that many pixels
    each way, int32 [2, b, 2], for the consistency term (passed as `shifts`; None otherwise).
    """
    images = scale_images(images)
    batch = tf.shape(images)[0]  # the per-replica batch, not the global one
    # Drawn from the in-scope Generator, outside any XLA cluster: every replica gets its own noise.
    noise = state.noise_generator.normal([batch, latent_dim])
    fake_digits = draw_fake_digits(state.noise_generator, batch, paired_digits)
    regularize = state.step % r1_interval == 0
    shifts = None
    if shift_pixels:
        shifts = state.noise_generator.uniform([2, batch, 2], -shift_pixels, shift_pixels + 1, dtype=tf.int32)
    generator_loss, discriminator_loss, generator_gradients, discriminator_gradients = gradients_function(
        images, digits, noise, fake_digits, regularize, shifts)
    _apply(state.generator_optimizer, generator_gradients, state.generator)
    _apply(state.discriminator_optimizer, discriminator_gradients, state.discriminator)
    return generator_loss, discriminator_loss


def draw_fake_digits(noise_generator: tf.random.Generator, batch, paired: bool = False):
    """int32 [batch] digits for G to draw, uniform over 0-9; `paired`: row ceil(batch/2) + i repeats row i."""
    if not paired:
        return noise_generator.uniform([batch], 0, models.NUM_CLASSES, dtype=tf.int32)
    first_half = noise_generator.uniform([batch - batch // 2], 0, models.NUM_CLASSES, dtype=tf.int32)
    return tf.concat([first_half, first_half[:batch // 2]], axis=0)


def losses_and_gradients(state: GanState, images, digits, noise, fake_digits, regularize=False, shifts=None, *,
                         global_batch_size: int, conditional: bool, classifier_weight: float = 0.0,
                         loss: str = "bce", r1_weight: float = 0.0, twin_classifier: float = 0.0,
                         mode_seeking: float = 0.0, classifier_confidence: float = 0.0,
                         generator_top_k: float = 1.0, total_steps: int = 1, consistency: float = 0.0,
                         centring: float = 0.0):
    """(generator_loss, discriminator_loss, G's gradients, D's gradients) of one forward and backward pass.

    images float32 [b, 28, 28, 1] in [-1, 1]; digits and fake_digits int32 [b]; noise float32 [b, latent].
    With `r1_weight` > 0 and `regularize` (a bool tensor) true, D's gradients also include
    r1_weight x E[|∇ₓD(real)|²] (not in the reported D loss). With `consistency` > 0 and `shifts` int32
    [2, b, 2] (the real and the fake images' moves), D's loss adds that weight of bCR's term (reported).
    With mixed_float16 the gradients are of the scaled losses; LossScaleOptimizer unscales them.
    """
    with tf.GradientTape() as generator_tape, tf.GradientTape() as discriminator_tape:
        generator_loss, discriminator_loss = compute_losses(state, images, digits, noise, fake_digits,
                                                            global_batch_size, conditional, training=True,
                                                            classifier_weight=classifier_weight, loss=loss,
                                                            twin_classifier=twin_classifier,
                                                            mode_seeking=mode_seeking,
                                                            classifier_confidence=classifier_confidence,
                                                            generator_top_k=generator_top_k,
                                                            total_steps=total_steps, consistency=consistency,
                                                            shifts=shifts, centring=centring)
        optimized_discriminator_loss = discriminator_loss
        if r1_weight:
            penalty = tf.cond(regularize,
                              lambda: r1_weight * r1_penalty(state, images, digits, global_batch_size, conditional),
                              lambda: tf.constant(0.0))
            optimized_discriminator_loss = discriminator_loss + penalty
        scaled_generator_loss = _scale(state.generator_optimizer, generator_loss)
        scaled_discriminator_loss = _scale(state.discriminator_optimizer, optimized_discriminator_loss)
    generator_gradients = generator_tape.gradient(scaled_generator_loss, state.generator.trainable_variables)
    discriminator_gradients = discriminator_tape.gradient(scaled_discriminator_loss,
                                                          state.discriminator.trainable_variables)
    return generator_loss, discriminator_loss, generator_gradients, discriminator_gradients


def r1_penalty(state: GanState, images, digits, global_batch_size: int, conditional: bool):
    """E[|∇ₓD(x)|²] over this replica's real images (divided by the global batch), differentiable in D's weights.

    D's adversarial logit is taken in inference mode (no dropout, no spectral-norm update), so the
    penalty measures D as it stands.
    """
    with tf.GradientTape() as input_tape:
        input_tape.watch(images)
        logits = discriminator_logit(state, images, digits, conditional, training=False)
        total = tf.reduce_sum(tf.cast(logits, tf.float32))
    return losses.r1_penalty(input_tape.gradient(total, images), global_batch_size)


def discriminator_logit(state: GanState, images, digits, conditional: bool, training: bool):
    """D's adversarial logit [b, 1] on `images`, whether or not D also has digit heads."""
    outputs = state.discriminator(models.discriminator_inputs(images, digits, conditional), training=training)
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def scale_images(images):
    """uint8 pixels 0..255 → float32 in [-1, 1] (the generator's output range)."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def compute_losses(state: GanState, images, digits, noise, fake_digits, global_batch_size: int, conditional: bool,
                   training: bool = True, classifier_weight: float = 0.0, loss: str = "bce",
                   twin_classifier: float = 0.0, mode_seeking: float = 0.0, classifier_confidence: float = 0.0,
                   generator_top_k: float = 1.0, total_steps: int = 1, consistency: float = 0.0, shifts=None,
                   centring: float = 0.0):
    """(generator_loss, discriminator_loss) of one forward pass, each divided by the GLOBAL batch size.

    Summing the replicas' values (and the optimizer summing their gradients) gives the
    single-device mean over the whole global batch. With `classifier_weight` > 0 (a discriminator
    built with the classifier head), D's loss adds the cross-entropy of its digit guess on the real
    images and G's loss the same on the fakes against the digits asked for (AC-GAN; D learns to
    classify from real images only, so it never learns the fakes' mistakes as a class); with
    `classifier_confidence` > 0, G's share stops at that probability (`losses.classifier_loss`). With
    `twin_classifier` > 0 (a discriminator with the twin head, TAC-GAN) D's loss also adds the twin's
    cross-entropy on the fakes, and G's subtracts that share of it. `loss` picks the adversarial
    loss: "bce", "hinge" or "relativistic" (`losses.adversarial_losses`). With `mode_seeking` > 0, G's
    loss adds that weight of `losses.mode_seeking_loss` (the fakes' digits must come paired). With
    `generator_top_k` < 1, G's adversarial loss counts only the fakes D rates most real, a share falling
    from all of them to `generator_top_k` over `total_steps` (`losses.strongest_fakes`). With `consistency` > 0,
    D's loss adds that weight of bCR's term on the real and the fake images moved by `shifts` int32 [2, b, 2]
    (`consistency_term`). With `centring` > 0, G's loss adds that weight of `losses.centring_penalty`.
    """
    generator_loss, discriminator_loss = losses.adversarial_losses(loss)
    fakes = state.generator(models.generator_inputs(noise, fake_digits, conditional), training=training)
    real_outputs = state.discriminator(models.discriminator_inputs(images, digits, conditional), training=training)
    fake_outputs = state.discriminator(models.discriminator_inputs(fakes, fake_digits, conditional), training=training)
    # With digit heads D returns [logit, class_logits(, twin_class_logits)]; without, the logit alone.
    real_logits, *real_heads = real_outputs if classifier_weight else [real_outputs]
    fake_logits, *fake_heads = fake_outputs if classifier_weight else [fake_outputs]
    if generator_top_k < 1:
        share = losses.top_k_share(state.step, total_steps, generator_top_k)
        adversarial_generator = generator_loss(*losses.strongest_fakes(real_logits, fake_logits, share,
                                                                       global_batch_size))
    else:
        adversarial_generator = generator_loss(real_logits, fake_logits, global_batch_size)
    adversarial_discriminator = discriminator_loss(real_logits, fake_logits, global_batch_size)
    if mode_seeking:
        adversarial_generator += mode_seeking * losses.mode_seeking_loss(fakes, noise, global_batch_size)
    if centring:
        adversarial_generator += centring * losses.centring_penalty(fakes, global_batch_size)
    if consistency:
        adversarial_discriminator += consistency * consistency_term(
            state, images, digits, real_logits, fakes, fake_digits, fake_logits, shifts, global_batch_size,
            conditional, training)
    if not classifier_weight:
        return adversarial_generator, adversarial_discriminator
    generator_classifier = losses.classifier_loss(fake_heads[0], fake_digits, global_batch_size,
                                                  confidence=classifier_confidence)
    discriminator_classifier = losses.classifier_loss(real_heads[0], digits, global_batch_size)
    if twin_classifier:
        # TAC-GAN: the twin head learns to name the fakes; G pushes its cross-entropy up, which cancels
        # the pull of the first head towards digits that are easy to name.
        twin = losses.classifier_loss(fake_heads[1], fake_digits, global_batch_size)
        generator_classifier -= twin_classifier * twin
        discriminator_classifier += twin
    return (adversarial_generator + classifier_weight * generator_classifier,
            adversarial_discriminator + classifier_weight * discriminator_classifier)


def consistency_term(state: GanState, images, digits, real_logits, fakes, fake_digits, fake_logits, shifts,
                     global_batch_size: int, conditional: bool, training: bool):
    """Balanced consistency regularisation (bCR, Zhao et al. 2021): D's logit should not change when an
    image, real or fake, moves by a few pixels. The mean squared change over both batches; D's weights
    only (the fakes enter as constants)."""
    total = 0.0
    for batch, batch_digits, logits, batch_shifts in ((images, digits, real_logits, shifts[0]),
                                                     (fakes, fake_digits, fake_logits, shifts[1])):
        moved_logits = discriminator_logit(state, losses.translate(batch, batch_shifts), batch_digits, conditional,
                                           training)
        total += losses.consistency_penalty(logits, moved_logits, global_batch_size)
    return total


def _scale(optimizer, loss):
    return optimizer.scale_loss(loss) if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else loss


def _apply(optimizer, gradients, model) -> None:
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))


def check_xla(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
    """ValueError when `config.xla` asks for XLA on more than one replica."""
    if config.xla and strategy.num_replicas_in_sync > 1:
        # Mirrored BatchNorm statistics synchronize the replicas inside the forward pass (a
        # merge_call), which TensorFlow cannot do inside a nested, XLA-compiled tf.function.
        raise ValueError(f"xla runs on one device only, not on {strategy.num_replicas_in_sync} replicas; "
                         "drop --set xla=true, or train on one device (--gpus 1, or the CPU without --cpu-replicas)")


def make_train_function(strategy: tf.distribute.Strategy, state: GanState, config: TrainConfig, global_batch_size: int):
    """Returns `train(iterator, steps) -> (mean generator loss, mean discriminator loss)` over `steps` steps.

    `steps` is a tensor, so a shorter final call does not retrace. Losses are summed across replicas
    (each is already divided by the global batch), which equals the single-device mean.
    """

    check_xla(config, strategy)  # loop.train checks too, before it writes; this guards direct callers
    gradients_function = functools.partial(
        losses_and_gradients, state, global_batch_size=global_batch_size, conditional=config.conditional,
        classifier_weight=config.classifier_weight, loss=config.loss, twin_classifier=config.twin_classifier,
        mode_seeking=config.mode_seeking, classifier_confidence=config.classifier_confidence,
        generator_top_k=config.generator_top_k,
        total_steps=planned_steps(config), consistency=config.consistency, centring=config.centring,
        # Lazy R1 (StyleGAN2): (γ/2)·E|∇D|², every r1_interval steps, so γ is scaled by the interval.
        r1_weight=config.r1_gamma / 2.0 * config.r1_interval)
    if config.xla:
        # Only the forward and backward pass is compiled; the optimizer updates run outside it.
        gradients_function = tf.function(gradients_function, jit_compile=True)

    def distributed_step(batch):
        images, digits = batch
        per_replica = strategy.run(replica_step, args=(state, images, digits, config.latent_dim, gradients_function,
                                                       config.r1_interval, config.mode_seeking > 0,
                                                       config.consistency_shift if config.consistency else 0))
        state.step.assign_add(1)
        if state.generator_average is not None:
            update = functools.partial(update_generator_average, state, config.generator_average_decay,
                                       config.generator_average_rampup, config.generator_average_interval)
            if config.generator_average_interval == 1:
                update()  # no conditional in the graph, so runs from before the field reproduce exactly
            else:
                tf.cond(state.step % config.generator_average_interval == 0, update, lambda: None)
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

    @tf.function
    def train(iterator, steps):
        totals = tf.zeros([2])
        for _ in tf.range(steps):
            totals += tf.stack(distributed_step(next(iterator)))
        means = totals / tf.cast(steps, tf.float32)
        return means[0], means[1]

    return train
