"""The public serving signatures of a digitgan bundle, written around the generator with Keras's `ExportArchive`.

All signatures run the generator in inference mode (BatchNorm moving statistics, no dropout) and
return images float32 [B, 28, 28, 1] in [0, 1] (0 = black background, 1 = white ink):

- `serving_default`: `noise` float32 [B, latent_dim] → `images`. A pure function of the noise. For a
  conditional generator the digit is read from the noise itself: digit = floor(10 * Phi(noise[:, 0]))
  (Phi = the standard normal CDF, capped at 9), which is uniform over 0..9 for standard normal noise.
- `conditional` (conditional models): `noise` float32 [B, latent_dim], `digit` int32 [B] → `images`.
- `sample`: `digit` int32 [B] (conditional models only) and `seed` int64 [B] → `images` and
  `png_bytes` (string [B], each a 28x28 8-bit grayscale PNG; the `_bytes` suffix makes TF Serving's
  REST API send it as `{"b64": ...}`). The noise for example i is
  `tf.random.stateless_normal([latent_dim], seed=[seed[i], 0])`, so "a 7, seed 42" is the same image
  for every client in every language.

Bad input (digits outside 0..9, a noise width other than latent_dim, digit/seed batch mismatch)
fails inside the graph with InvalidArgument and a message saying what was expected.
Only standard TensorFlow ops are used, so `tensorflow_model_server` loads the bundle as it is.
"""
from __future__ import annotations

import math

import tensorflow as tf

from trainer import models

NUM_CLASSES = models.NUM_CLASSES
NOISE_SEED_SALT = 0  # second half of the stateless seed pair; part of the public contract
# TF Serving's REST API writes a string output as {"b64": ...} only when its alias ends in "_bytes"
# (json_tensor.cc, IsNamedTensorBytes); otherwise the raw PNG bytes would go out as a JSON string.
PNG_OUTPUT = "png_bytes"


def digit_from_noise(noise: tf.Tensor) -> tf.Tensor:
    """int32 [B]: floor(10 * Phi(noise[:, 0])), capped at 9; uniform over 0..9 for N(0, 1) noise."""
    cdf = 0.5 * (1.0 + tf.math.erf(noise[:, 0] / math.sqrt(2.0)))
    return tf.minimum(tf.cast(tf.floor(cdf * NUM_CLASSES), tf.int32), NUM_CLASSES - 1)


class GeneratorSignatures:
    """The generator and the signature functions, written out with Keras's `ExportArchive`.

    `ExportArchive` (not `tf.saved_model.save` of a `tf.Module` holding the Keras model) because a
    Keras 3 variable is a wrapper around a `tf.Variable`: a module that tracks the wrappers saves
    copies of them, while the traced functions read the wrapped `tf.Variable`s, which nothing
    restores, and TF1-style loaders (as `tensorflow_model_server` uses) fail with "Could not find
    variable". `ExportArchive` saves the `tf.Variable`s the endpoints capture; `write` tracks those
    same `tf.Variable`s and not the wrappers (`ExportArchive.track(model)` would add the wrappers
    too, and the checkpoint would hold every weight twice, keras-team/keras#23553).
    """

    VARIABLE_COLLECTION = "generator_variables"
    """The name under which a loaded bundle lists the generator's weights (`loaded.generator_variables`)."""

    def __init__(self, generator, latent_dim: int, conditional: bool):
        self.generator = generator
        self.latent_dim = latent_dim
        self.conditional = conditional

    def endpoints(self) -> list[tuple[str, object, list[tf.TensorSpec]]]:
        """(signature name, function, input specs) for every public signature."""
        noise_spec = tf.TensorSpec([None, self.latent_dim], tf.float32, name="noise")
        digit_spec = tf.TensorSpec([None], tf.int32, name="digit")
        seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
        if not self.conditional:
            return [("serving_default", self.serving_default, [noise_spec]),
                    ("sample", self._sample_unconditional, [seed_spec])]
        return [("serving_default", self.serving_default, [noise_spec]),
                ("conditional", self._conditional, [noise_spec, digit_spec]),
                ("sample", self._sample_conditional, [digit_spec, seed_spec])]

    def write(self, path: str) -> None:
        """Writes the SavedModel (tag `serve`) with every endpoint as a signature, each weight stored once."""
        import keras

        archive = keras.export.ExportArchive()
        archive.add_variable_collection(self.VARIABLE_COLLECTION, self.tf_variables())
        for name, function, input_signature in self.endpoints():
            archive.add_endpoint(name, function, input_signature=input_signature)
        archive.write_out(path, verbose=False)

    def tf_variables(self) -> list[tf.Variable]:
        """The `tf.Variable` behind each of the generator's Keras variables (what the endpoints capture)."""
        unwrapped = [variable.value for variable in self.generator.weights]
        wrong = [type(value).__name__ for value in unwrapped if not isinstance(value, tf.Variable)]
        if wrong:  # e.g. read inside an autocast scope, which returns a cast tensor instead
            raise TypeError(f"the generator's variables must wrap tf.Variables, got {sorted(set(wrong))}")
        return unwrapped

    def _images(self, noise, digits):
        raw = self.generator(models.generator_inputs(noise, digits, self.conditional), training=False)
        return tf.clip_by_value((tf.cast(raw, tf.float32) + 1.0) / 2.0, 0.0, 1.0)

    # Each check returns its input behind a control dependency on its assertion, so the assertion runs
    # before an op that would fail on the same bad input with a less useful error (e.g. a concat).
    def _check_noise(self, noise):
        check = tf.debugging.assert_equal(tf.shape(noise)[1], self.latent_dim,
                                          message=f"noise must have shape [batch, {self.latent_dim}]")
        with tf.control_dependencies([check]):
            return tf.identity(noise)

    def _check_digits(self, digits):
        in_range = tf.reduce_all((digits >= 0) & (digits < NUM_CLASSES))
        check = tf.debugging.Assert(in_range, ["digit must be in 0..9, got", digits], summarize=16)
        with tf.control_dependencies([check]):
            return tf.identity(digits)

    @staticmethod
    def _check_same_batch(first, second, message):
        """`first`, `second` unchanged, both only available once their batch sizes were found equal."""
        check = tf.debugging.assert_equal(tf.shape(first)[0], tf.shape(second)[0], message=message)
        with tf.control_dependencies([check]):
            return tf.identity(first), tf.identity(second)

    def serving_default(self, noise):
        noise = self._check_noise(noise)
        digits = digit_from_noise(noise) if self.conditional else None
        return {"images": self._images(noise, digits)}

    def _conditional(self, noise, digit):
        noise, digit = self._check_same_batch(self._check_noise(noise), digit,
                                              "noise and digit must have the same batch size")
        return {"images": self._images(noise, self._check_digits(digit))}

    def _noise_from_seeds(self, seed):
        return tf.map_fn(lambda one: tf.random.stateless_normal([self.latent_dim], seed=tf.stack([one, NOISE_SEED_SALT])),
                         seed, fn_output_signature=tf.TensorSpec([self.latent_dim], tf.float32))

    def _with_png(self, images):
        pixels = tf.cast(tf.round(images * 255.0), tf.uint8)
        png = tf.map_fn(tf.io.encode_png, pixels, fn_output_signature=tf.TensorSpec([], tf.string))
        return {"images": images, PNG_OUTPUT: png}

    def _sample_conditional(self, digit, seed):
        digit, seed = self._check_same_batch(digit, seed, "digit and seed must have the same batch size")
        digit = self._check_digits(digit)
        return self._with_png(self._images(self._noise_from_seeds(seed), digit))

    def _sample_unconditional(self, seed):
        return self._with_png(self._images(self._noise_from_seeds(seed), None))
