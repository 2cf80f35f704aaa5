"""The training state and the compiled, distributed GAN step.

`build_state` creates everything that has variables under `strategy.scope()`;
`replica_step` is one tutorial-style update of D and G on one replica's slice of the batch;
`make_train_function` compiles `steps` of them into one `tf.function` call over a distributed
iterator, so Python runs once per call, not once per step.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from trainer import losses, models
from trainer.config import TrainConfig


@dataclasses.dataclass
class GanState:
    """Everything a checkpoint holds: both models, both optimizers, the step and the noise RNG."""

    generator: keras.Model
    discriminator: keras.Model
    generator_optimizer: keras.optimizers.Optimizer
    discriminator_optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    noise_generator: tf.random.Generator

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(generator=self.generator, discriminator=self.discriminator,
                                   generator_optimizer=self.generator_optimizer,
                                   discriminator_optimizer=self.discriminator_optimizer,
                                   step=self.step, noise_generator=self.noise_generator)


def build_state(config: TrainConfig, strategy: tf.distribute.Strategy) -> GanState:
    """Models, optimizers, step counter and RNG, all created in `strategy.scope()`."""
    keras.mixed_precision.set_global_policy(config.precision)
    keras.utils.set_random_seed(config.seed)  # the initial weights depend on the seed only
    with strategy.scope():
        several_replicas = strategy.num_replicas_in_sync > 1
        generator = models.build_generator(config.latent_dim, config.conditional, synchronized_batch_norm=several_replicas)
        discriminator = models.build_discriminator(config.conditional, per_replica_dropout=several_replicas)
        generator_optimizer = _adam(config)
        discriminator_optimizer = _adam(config)
        # Optimizers must be built before the first distributed step, or the first
        # apply_gradients inside strategy.run fails (Keras 3 creates slots lazily).
        generator_optimizer.build(generator.trainable_variables)
        discriminator_optimizer.build(discriminator.trainable_variables)
        # A Generator created in the scope gives each replica its own stream, so replicas draw
        # different noise (Keras SeedGenerator noise would be identical on every replica).
        noise_generator = tf.random.Generator.from_seed(config.seed)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return GanState(generator, discriminator, generator_optimizer, discriminator_optimizer, step, noise_generator)


def _adam(config: TrainConfig) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.Adam(config.learning_rate, beta_1=config.beta_1)
    if config.precision == "mixed_float16":
        # float16 gradients underflow without loss scaling; the wrapper scales the loss and
        # unscales (and skips non-finite) gradients inside apply_gradients.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def replica_step(state: GanState, images, digits, global_batch_size: int, latent_dim: int, conditional: bool):
    """One D and G update on this replica's batch. Returns (generator_loss, discriminator_loss).

    images uint8 [b, 28, 28, 1] (MNIST pixels); digits int32 [b]; b = this replica's share of the batch.
    """
    images = scale_images(images)
    batch = tf.shape(images)[0]  # the per-replica batch, not the global one
    # Drawn from the in-scope Generator: every replica gets its own noise.
    noise = state.noise_generator.normal([batch, latent_dim])
    fake_digits = state.noise_generator.uniform([batch], 0, models.NUM_CLASSES, dtype=tf.int32)
    with tf.GradientTape() as generator_tape, tf.GradientTape() as discriminator_tape:
        generator_loss, discriminator_loss = compute_losses(state, images, digits, noise, fake_digits,
                                                            global_batch_size, conditional, training=True)
        scaled_generator_loss = _scale(state.generator_optimizer, generator_loss)
        scaled_discriminator_loss = _scale(state.discriminator_optimizer, discriminator_loss)
    _apply(state.generator_optimizer, generator_tape, scaled_generator_loss, state.generator)
    _apply(state.discriminator_optimizer, discriminator_tape, scaled_discriminator_loss, state.discriminator)
    return generator_loss, discriminator_loss


def scale_images(images):
    """uint8 pixels 0..255 → float32 in [-1, 1] (the generator's tanh range)."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def compute_losses(state: GanState, images, digits, noise, fake_digits, global_batch_size: int, conditional: bool,
                   training: bool = True):
    """(generator_loss, discriminator_loss) of one forward pass, each divided by the GLOBAL batch size.

    Summing the replicas' values (and the optimizer summing their gradients) gives the
    single-device mean over the whole global batch.
    """
    fakes = state.generator(models.generator_inputs(noise, fake_digits, conditional), training=training)
    real_logits = state.discriminator(models.discriminator_inputs(images, digits, conditional), training=training)
    fake_logits = state.discriminator(models.discriminator_inputs(fakes, fake_digits, conditional), training=training)
    return (losses.generator_loss(fake_logits, global_batch_size),
            losses.discriminator_loss(real_logits, fake_logits, global_batch_size))


def _scale(optimizer, loss):
    return optimizer.scale_loss(loss) if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else loss


def _apply(optimizer, tape, loss, model) -> None:
    variables = model.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))


def make_train_function(strategy: tf.distribute.Strategy, state: GanState, config: TrainConfig, global_batch_size: int):
    """Returns `train(iterator, steps) -> (mean generator loss, mean discriminator loss)` over `steps` steps.

    `steps` is a tensor, so a shorter final call does not retrace. Losses are summed across replicas
    (each is already divided by the global batch), which equals the single-device mean.
    """

    def distributed_step(batch):
        images, digits = batch
        per_replica = strategy.run(replica_step, args=(state, images, digits, global_batch_size,
                                                       config.latent_dim, config.conditional))
        state.step.assign_add(1)
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

    @tf.function
    def train(iterator, steps):
        totals = tf.zeros([2])
        for _ in tf.range(steps):
            totals += tf.stack(distributed_step(next(iterator)))
        means = totals / tf.cast(steps, tf.float32)
        return means[0], means[1]

    return train
