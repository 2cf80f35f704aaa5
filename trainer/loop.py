"""The training driver: `train(config)` sets up the strategy, state, checkpoints and data, then runs
the epochs (`_Run`), saving checkpoints, sample grids and TensorBoard summaries as it goes.

Checkpoints (finding, restoring, repairing, saving) are in `trainer/checkpoints.py`; summaries,
sample grids and the per-epoch judge's plumbing in `trainer/summaries.py`. Resuming is exact (see
`trainer/checkpoints.py`), so an interrupted and resumed run ends with the weights of an
uninterrupted one (tests/trainer/test_faults.py). A non-finite loss stops the run, and weights
that turned non-finite are never saved.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Callable

import tensorflow as tf
import tqdm

from common import cpu_kernels
from mnist_data import acquire
from trainer import checkpoints, data, step as step_lib, strategy as strategy_lib, summaries
from trainer.checkpoints import NonFiniteLossError
from trainer.config import TrainConfig

__all__ = ["NonFiniteLossError", "StopRequested", "TrainResult", "train"]


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


def train(config: TrainConfig, report: Callable[[str], None] = print, progress: bool = True,
          epoch_judge: summaries.EpochJudgeFactory | None = None) -> TrainResult:
    """Trains the GAN described by `config`, resuming from `config.run_dir` when allowed.

    Sets Keras's global precision policy and the random seeds for this process
    (`step.set_globals_and_build_state`). `epoch_judge` (the CLI passes
    `quality.epochs.EpochQuality`) gives per-epoch quality figures when `config.evaluate_every_epoch`
    is set; without it there are none.
    """
    strategy, config = _strategy_and_precision(config, report)
    chief = strategy_lib.is_chief(strategy)
    state = step_lib.set_globals_and_build_state(config, strategy)
    checkpoint = state.checkpoint()
    manager = checkpoints.manager(checkpoint, config, strategy)
    # Checkpoints before data: a run dir that cannot be resumed fails in seconds, not after the data load.
    start_step = checkpoints.restore_newest(manager, checkpoint, state, config, report)
    checkpoints.check_workers_agree(strategy, state.step)
    checkpoints.remove_partial_saves(Path(manager.directory), report)
    mnist = acquire.load_mnist(config.data_dir, report)
    if chief:
        config.save()
    run = _Run(config, strategy, state, manager, mnist, chief, start_step)
    writer = summaries.writer(config, chief)
    # The judge and its real-data reference are prepared before the clock starts, like the data,
    # and only by runs that will reach an epoch end.
    if chief and epoch_judge is not None and config.evaluate_every_epoch and run.reaches_an_epoch_end():
        run.judge = summaries.start_epoch_judge(epoch_judge, config, mnist, report)
    started = time.perf_counter()
    run.bar = tqdm.tqdm(total=run.total_steps, initial=start_step, unit="step", disable=not (progress and chief),
                        dynamic_ncols=True, desc="training")
    # The bar is closed on the way out of an error too, so the error prints on a line of its own.
    with StopRequested() as run.stop, writer.as_default(), run.bar:
        while run.current < run.total_steps and run.stop.signal_number is None:
            run.train_epoch()
        run.save_final()
    writer.flush()
    if chief:
        summaries.write_progress_animation(config)
    seconds = time.perf_counter() - started
    if run.stop.signal_number is not None:
        report(f"Stopped by signal {run.stop.signal_number} at step {run.current}; checkpoint saved, rerun to resume.")
    else:
        report(f"Done: step {run.current} in {seconds:.0f} s; checkpoint {manager.latest_checkpoint}")
    return TrainResult(run.current, run.current // run.steps_per_epoch, run.generator_loss, run.discriminator_loss,
                       manager.latest_checkpoint, run.stop.signal_number, seconds)


def _strategy_and_precision(config: TrainConfig, report: Callable[[str], None]) -> tuple[tf.distribute.Strategy, TrainConfig]:
    """The run's strategy, and `config` with `precision` resolved (config.json records it, so a resume keeps it).

    Refuses what cannot run (a batch that does not split over the replicas, XLA on several
    replicas) before anything is written to the run dir.
    """
    strategy = strategy_lib.create_strategy(config.gpus, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {replicas} replicas; "
                         f"use a multiple of {replicas}")
    step_lib.check_xla(config, strategy)
    report(f"Strategy: {strategy_lib.describe(strategy)}")
    report(f"CPU kernels: {cpu_kernels.in_use()}")
    if config.precision == "auto":
        config = dataclasses.replace(config, precision=strategy_lib.resolve_precision(config.precision, strategy))
        report(f"Precision: {config.precision} (auto: "
               f"{'bfloat16 is faster than float32 on CPUs like this one' if config.precision != 'float32' else 'a GPU run, or bfloat16 not faster on this CPU'})")
    return strategy, config


class _Run:
    """One run's moving parts and where it stands; `train` sets `bar`, `stop` and `judge`."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy, state: step_lib.GanState,
                 manager: tf.train.CheckpointManager, mnist: acquire.Mnist, chief: bool, start_step: int):
        self.config, self.strategy, self.state, self.manager, self.mnist, self.chief = (
            config, strategy, state, manager, mnist, chief)
        self.steps_per_epoch = data.steps_per_epoch(len(mnist.train_images), config.batch_size)
        self.total_steps = min(config.epochs * self.steps_per_epoch, config.max_steps or math.inf)
        self.train_function = step_lib.make_train_function(strategy, state, config, config.batch_size)
        self.fixed_noise, self.fixed_digits = summaries.fixed_sample_inputs(config)
        self.current = self.last_saved = start_step
        self.generator_loss = self.discriminator_loss = float("nan")
        self.judge: summaries.EpochJudge | None = None
        self.bar: tqdm.tqdm | None = None
        self.stop: StopRequested | None = None

    def reaches_an_epoch_end(self) -> bool:
        return self.total_steps >= (self.current // self.steps_per_epoch + 1) * self.steps_per_epoch

    def train_epoch(self) -> None:
        """Trains from the current step to the end of its epoch (or of the run, or a signal)."""
        config = self.config
        epoch, offset = divmod(self.current, self.steps_per_epoch)
        dataset_fn = data.epoch_dataset_fn(self.mnist.train_images, self.mnist.train_labels, config.batch_size,
                                           config.seed, epoch, skip_batches=offset)
        iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
        epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        while self.current < epoch_end and self.stop.signal_number is None:
            self._call(iterator, min(config.steps_per_call, epoch_end - self.current))
            if self.current - self.last_saved >= config.checkpoint_every_steps:
                checkpoints.save(self.manager, self.state, self.current)
                self.last_saved = self.current
        if self.current == epoch_end and self.current % self.steps_per_epoch == 0:
            self._end_epoch(epoch + 1)

    def _call(self, iterator, steps: int) -> None:
        """Runs `steps` steps in one compiled call; logs the losses and the speed, stops on a non-finite loss."""
        call_started = time.perf_counter()
        losses = self.train_function(iterator, tf.constant(steps, tf.int32))
        self.generator_loss, self.discriminator_loss = (float(value) for value in losses)
        self.current = int(self.state.step.numpy())
        if not (math.isfinite(self.generator_loss) and math.isfinite(self.discriminator_loss)):
            raise NonFiniteLossError(
                f"loss became non-finite at step {self.current} (G {self.generator_loss}, D {self.discriminator_loss}); "
                f"{checkpoints.divergence_advice(self.manager)}")
        elapsed = max(time.perf_counter() - call_started, 1e-9)
        self.bar.update(steps)
        self.bar.set_postfix(images_per_s=f"{steps * self.config.batch_size / elapsed:,.0f}",
                             G=f"{self.generator_loss:.3f}", D=f"{self.discriminator_loss:.3f}", refresh=False)
        summaries.log_losses(self.generator_loss, self.discriminator_loss, self.current)

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's line, sample grid and (when plugged in) judged figures."""
        self.bar.write(f"epoch {epoch}/{self.config.epochs}: step {self.current}, "
                       f"G loss {self.generator_loss:.4f}, D loss {self.discriminator_loss:.4f}")
        generator = self.state.sampling_generator
        if self.chief:
            summaries.write_samples(generator, self.config, self.fixed_noise, self.fixed_digits, epoch, self.current)
        if self.judge is not None:
            self.judge = summaries.log_epoch_judge(self.judge, generator, self.config.conditional, self.current,
                                                   self.bar.write)

    def save_final(self) -> None:
        """The last checkpoint (unless just saved) and, when the run stopped mid-epoch, a grid of where it is."""
        if self.current != self.last_saved or self.manager.latest_checkpoint is None:
            checkpoints.save(self.manager, self.state, self.current)
        if self.chief and self.current % self.steps_per_epoch:
            summaries.write_samples(self.state.sampling_generator, self.config, self.fixed_noise, self.fixed_digits,
                                    None, self.current)
