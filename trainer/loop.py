"""The training driver: data, strategy, state, checkpoints, progress, summaries and sample grids.

`train(config)` is the one long function (the driver); the pieces it calls are short and tested on
their own. Resuming is exact: the checkpoint holds the step, and the step alone fixes the epoch,
the position inside it (the epoch order is a function of seed and epoch) and the RNG state.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
import tqdm

from common import images as image_grids
from trainer import data, models, step as step_lib, strategy as strategy_lib
from trainer.config import TrainConfig

SAMPLES_PER_DIGIT = 10  # the sample grid: one row per digit (conditional) or 100 fixed noises


@dataclasses.dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    epoch: int
    generator_loss: float
    discriminator_loss: float
    checkpoint: str | None
    interrupted_by: int | None = None  # the signal number when SIGINT/SIGTERM stopped the run
    seconds: float = 0.0


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks between calls, so it can save and exit cleanly."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
                pass
        return self

    def _handle(self, number, frame):
        self.signal_number = number

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class NonFiniteLossError(RuntimeError):
    """The GAN diverged (a NaN or infinite loss); the last good checkpoint is left untouched."""


def train(config: TrainConfig, report: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Trains the GAN described by `config`, resuming from `config.run_dir` when allowed."""
    strategy = strategy_lib.create_strategy(config.gpus, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {replicas} replicas; "
                         f"use a multiple of {replicas}")
    chief = strategy_lib.is_chief(strategy)
    report(f"Strategy: {strategy_lib.describe(strategy)}")
    mnist = data.load_mnist(config.data_dir, report)
    state = step_lib.build_state(config, strategy)
    checkpoint = state.checkpoint()
    manager = _checkpoint_manager(checkpoint, config, strategy)
    start_step = _restore(manager, checkpoint, config, report)
    _check_workers_agree(strategy, state.step)
    if chief:
        config.save()
    steps_per_epoch = data.steps_per_epoch(len(mnist.train_images), config.batch_size)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    train_function = step_lib.make_train_function(strategy, state, config, config.batch_size)
    writer = tf.summary.create_file_writer(str(Path(config.run_dir) / "logs")) if chief else tf.summary.create_noop_writer()
    fixed_noise, fixed_digits = _fixed_sample_inputs(config)
    generator_loss = discriminator_loss = float("nan")
    started = time.perf_counter()
    current = start_step
    bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", disable=not (progress and chief),
                    dynamic_ncols=True, desc="training")
    last_saved = start_step
    with StopRequested() as stop, writer.as_default():
        while current < total_steps and stop.signal_number is None:
            epoch, offset = divmod(current, steps_per_epoch)
            dataset_fn = data.epoch_dataset_fn(mnist.train_images, mnist.train_labels, config.batch_size,
                                               config.seed, epoch, skip_batches=offset)
            iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
            while current < epoch_end and stop.signal_number is None:
                steps = min(config.steps_per_call, epoch_end - current)
                call_started = time.perf_counter()
                losses = train_function(iterator, tf.constant(steps, tf.int32))
                generator_loss, discriminator_loss = (float(value) for value in losses)
                current = int(state.step.numpy())
                if not (math.isfinite(generator_loss) and math.isfinite(discriminator_loss)):
                    raise NonFiniteLossError(
                        f"loss became non-finite at step {current} (G {generator_loss}, D {discriminator_loss}); "
                        f"the last good checkpoint ({manager.latest_checkpoint}) is intact: lower --learning-rate "
                        "or use --precision float32, then rerun to resume from it")
                elapsed = max(time.perf_counter() - call_started, 1e-9)
                bar.update(steps)
                bar.set_postfix(images_per_s=f"{steps * config.batch_size / elapsed:,.0f}",
                                G=f"{generator_loss:.3f}", D=f"{discriminator_loss:.3f}", refresh=False)
                tf.summary.scalar("loss/generator", generator_loss, step=current)
                tf.summary.scalar("loss/discriminator", discriminator_loss, step=current)
                if current - last_saved >= config.checkpoint_every_steps:
                    manager.save(checkpoint_number=current)
                    last_saved = current
            if current == epoch_end and current % steps_per_epoch == 0:
                bar.write(f"epoch {epoch + 1}/{config.epochs}: step {current}, "
                          f"G loss {generator_loss:.4f}, D loss {discriminator_loss:.4f}")
                if chief:
                    _write_samples(state.generator, config, fixed_noise, fixed_digits, epoch + 1, current)
        if current != last_saved or manager.latest_checkpoint is None:
            manager.save(checkpoint_number=current)
        if chief and current % steps_per_epoch:  # stopped mid-epoch: still show where the digits are
            _write_samples(state.generator, config, fixed_noise, fixed_digits, None, current)
    bar.close()
    writer.flush()
    seconds = time.perf_counter() - started
    if stop.signal_number is not None:
        report(f"Stopped by signal {stop.signal_number} at step {current}; checkpoint saved, rerun to resume.")
    else:
        report(f"Done: step {current} in {seconds:.0f} s; checkpoint {manager.latest_checkpoint}")
    return TrainResult(current, current // steps_per_epoch, generator_loss, discriminator_loss,
                       manager.latest_checkpoint, stop.signal_number, seconds)


def _checkpoint_manager(checkpoint: tf.train.Checkpoint, config: TrainConfig,
                        strategy: tf.distribute.Strategy) -> tf.train.CheckpointManager:
    # Under several workers every worker must take part in a save; the chief writes the run's
    # checkpoints, every other worker its own copy (identical weights) in a hidden directory of
    # its own, which it also resumes from when it cannot see the chief's (no shared file system).
    if strategy_lib.is_chief(strategy):
        return tf.train.CheckpointManager(checkpoint, str(config.checkpoint_dir), max_to_keep=config.keep_checkpoints)
    return tf.train.CheckpointManager(checkpoint, str(worker_checkpoint_dir(config, strategy_lib.task_index(strategy))),
                                      max_to_keep=1)


def worker_checkpoint_dir(config: TrainConfig, task_index: int) -> Path:
    """Where non-chief worker `task_index` writes its share of each checkpoint save."""
    return Path(config.run_dir) / f".worker-{task_index}-checkpoints"


def _restore(manager: tf.train.CheckpointManager, checkpoint: tf.train.Checkpoint, config: TrainConfig,
             report: Callable[[str], None]) -> int:
    """Restores the newest checkpoint when resuming is allowed; returns the step to continue from.

    A non-chief worker restores the chief's checkpoint when it can see it (shared run dir), else its own.
    """
    latest = tf.train.latest_checkpoint(str(config.checkpoint_dir)) or manager.latest_checkpoint
    if latest is None:
        return 0
    if not config.resume:
        raise ValueError(f"run dir '{config.run_dir}' already holds checkpoints ({latest}); "
                         "pass --resume to continue it, or choose a new --run-dir")
    try:
        checkpoint.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise ValueError(f"checkpoint {latest} does not match this model ({type(error).__name__}); "
                         "was it trained with other --latent-dim / --conditional options? "
                         f"Use those, or a new --run-dir") from None
    step = int(checkpoint.step.numpy())
    report(f"Resumed from step {step} ({latest})")
    return step


def _check_workers_agree(strategy: tf.distribute.Strategy, step: tf.Variable) -> None:
    """Under several workers, fails on every worker unless all of them resumed from the same step."""
    if not strategy_lib.is_multi_worker(strategy):
        return
    steps = strategy.gather(strategy.run(tf.function(lambda: tf.reshape(tf.identity(step), [1]))), axis=0).numpy()
    if len(set(steps.tolist())) > 1:
        raise ValueError(f"the workers resumed from different steps ({', '.join(map(str, steps))} per replica): "
                         "each worker must see the chief's newest checkpoint (a shared --run-dir) or hold its own "
                         "copy of it; remove the stale checkpoints or use a new --run-dir")


def _fixed_sample_inputs(config: TrainConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """The noise (and digits: one row per digit) that every epoch's sample grid uses."""
    count = models.NUM_CLASSES * SAMPLES_PER_DIGIT
    noise = tf.constant(np.random.default_rng(config.seed).standard_normal((count, config.latent_dim)), tf.float32)
    digits = tf.constant(np.repeat(np.arange(models.NUM_CLASSES), SAMPLES_PER_DIGIT), tf.int32)
    return noise, digits


def sample_images(generator, noise, digits, conditional: bool) -> np.ndarray:
    """Generator output in inference mode (BatchNorm moving statistics): float32 [N, 28, 28, 1] in [-1, 1]."""
    return generator(models.generator_inputs(noise, digits, conditional), training=False).numpy()


def _write_samples(generator, config: TrainConfig, noise, digits, epoch: int | None, step: int) -> None:
    """Writes `samples/epoch_NNN.png` (or `samples/step_NNNNNNN.png` mid-epoch) and a TensorBoard image summary."""
    pictures = sample_images(generator, noise, digits, config.conditional)
    name = f"epoch_{epoch:03d}.png" if epoch is not None else f"step_{step:07d}.png"
    path = Path(config.run_dir) / "samples" / name
    image_grids.save_grid(path, pictures, columns=SAMPLES_PER_DIGIT, value_range=(-1.0, 1.0))
    tf.summary.image("samples", (pictures[:SAMPLES_PER_DIGIT * 4] + 1.0) / 2.0, step=step, max_outputs=40)
