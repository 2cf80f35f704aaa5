"""The training driver: data, strategy, state, checkpoints, progress, summaries and sample grids.

`train(config)` is the one long function (the driver); the pieces it calls are short and tested on
their own. Resuming is exact: the checkpoint holds the step and every random state (noise and
dropout seeds), and the step alone fixes the epoch and the position inside it (the epoch order is a
function of seed and epoch), so an interrupted and resumed run ends with the weights of an
uninterrupted one (tests/trainer/test_faults.py).

Faults: a checkpoint that cannot be read (truncated, garbled, missing files) or holds NaN/inf is
reported and skipped for the previous one; when none can be restored the run stops rather than
start over. A non-finite loss stops the run, and weights that turned non-finite are never saved.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
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
    """The GAN diverged (a NaN or infinite loss or weights); the last good checkpoint is left untouched."""


def train(config: TrainConfig, report: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Trains the GAN described by `config`, resuming from `config.run_dir` when allowed."""
    strategy = strategy_lib.create_strategy(config.gpus, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {replicas} replicas; "
                         f"use a multiple of {replicas}")
    step_lib.check_xla(config, strategy)  # before anything is written to the run dir
    chief = strategy_lib.is_chief(strategy)
    report(f"Strategy: {strategy_lib.describe(strategy)}")
    if config.precision == "auto":  # config.json records the resolved precision, so a resume keeps it
        config = dataclasses.replace(config, precision=strategy_lib.resolve_precision(config.precision, strategy))
        report(f"Precision: {config.precision} (auto: "
               f"{'this CPU computes bfloat16 natively' if config.precision != 'float32' else 'a GPU run, or no native bfloat16 on this CPU'})")
    state = step_lib.build_state(config, strategy)
    checkpoint = state.checkpoint()
    manager = _checkpoint_manager(checkpoint, config, strategy)
    # Checkpoints before data: a run dir that cannot be resumed fails in seconds, not after the data load.
    start_step = _restore(manager, checkpoint, state, config, report)
    _check_workers_agree(strategy, state.step)
    _remove_partial_saves(Path(manager.directory), report)
    mnist = data.load_mnist(config.data_dir, report)
    if chief:
        config.save()
    steps_per_epoch = data.steps_per_epoch(len(mnist.train_images), config.batch_size)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    train_function = step_lib.make_train_function(strategy, state, config, config.batch_size)
    writer = tf.summary.create_file_writer(str(Path(config.run_dir) / "logs")) if chief else tf.summary.create_noop_writer()
    fixed_noise, fixed_digits = _fixed_sample_inputs(config)
    generator_loss = discriminator_loss = float("nan")
    # The shipped judge and its real-data reference are prepared before the clock starts, like the
    # data, and only by runs that will reach an epoch end; False means no per-epoch figures.
    reaches_epoch_end = total_steps >= (start_step // steps_per_epoch + 1) * steps_per_epoch
    quality = _epoch_quality(config, mnist, report) if chief and config.evaluate_every_epoch and reaches_epoch_end else False
    started = time.perf_counter()
    current = start_step
    bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", disable=not (progress and chief),
                    dynamic_ncols=True, desc="training")
    last_saved = start_step
    # The bar is closed on the way out of an error too, so the error prints on a line of its own.
    with StopRequested() as stop, writer.as_default(), bar:
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
                        f"{_divergence_advice(manager)}")
                elapsed = max(time.perf_counter() - call_started, 1e-9)
                bar.update(steps)
                bar.set_postfix(images_per_s=f"{steps * config.batch_size / elapsed:,.0f}",
                                G=f"{generator_loss:.3f}", D=f"{discriminator_loss:.3f}", refresh=False)
                tf.summary.scalar("loss/generator", generator_loss, step=current)
                tf.summary.scalar("loss/discriminator", discriminator_loss, step=current)
                if current - last_saved >= config.checkpoint_every_steps:
                    _save(manager, state, current)
                    last_saved = current
            if current == epoch_end and current % steps_per_epoch == 0:
                bar.write(f"epoch {epoch + 1}/{config.epochs}: step {current}, "
                          f"G loss {generator_loss:.4f}, D loss {discriminator_loss:.4f}")
                if chief:
                    _write_samples(state.sampling_generator, config, fixed_noise, fixed_digits, epoch + 1, current)
                if quality:
                    quality = _log_quality(quality, state.sampling_generator, config.conditional, current, bar.write)
        if current != last_saved or manager.latest_checkpoint is None:
            _save(manager, state, current)
        if chief and current % steps_per_epoch:  # stopped mid-epoch: still show where the digits are
            _write_samples(state.sampling_generator, config, fixed_noise, fixed_digits, None, current)
    writer.flush()
    if chief:  # the training-progress animation, as the TensorFlow DCGAN tutorial makes
        samples = Path(config.run_dir) / "samples"
        image_grids.save_animation(samples / "progress.gif", sorted(samples.glob("epoch_*.png")))
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


def _restore(manager: tf.train.CheckpointManager, checkpoint: tf.train.Checkpoint, state: step_lib.GanState,
             config: TrainConfig, report: Callable[[str], None]) -> int:
    """Restores the newest usable checkpoint when resuming is allowed; returns the step to continue from.

    An unreadable checkpoint (truncated, garbled, files missing) or one holding NaN/inf is reported
    and the previous one tried: a restarted job loses at most a few checkpoint intervals rather than
    crash-loop. A model mismatch, or no usable checkpoint at all, stops the run: starting over
    would silently discard the run. A non-chief worker restores the chief's checkpoints when it can
    see them (shared run dir), else its own.
    """
    candidates = _checkpoint_candidates(config.checkpoint_dir) or _checkpoint_candidates(Path(manager.directory))
    if not candidates:
        return 0
    if not config.resume:
        raise ValueError(f"run dir '{config.run_dir}' already holds checkpoints ({candidates[0]}); "
                         "pass --resume to continue it, or choose a new --run-dir")
    problems = []
    for path in candidates:
        problem = _restore_one(checkpoint, state, path)
        if problem is None:
            step = int(state.step.numpy())
            report(f"Resumed from step {step} ({path})")
            return step
        report(f"Skipping checkpoint {path}: {problem}")
        problems.append(f"{Path(path).name}: {problem}")
    raise ValueError(f"none of the {len(candidates)} checkpoint(s) in '{Path(candidates[0]).parent}' can be restored "
                     f"({'; '.join(problems)}); move that folder away to train from scratch, or use a new --run-dir")


def _restore_one(checkpoint: tf.train.Checkpoint, state: step_lib.GanState, path: str) -> str | None:
    """Restores `path`; returns why it is unusable, or None when the state now holds it."""
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise ValueError(f"checkpoint {path} does not match this model ({type(error).__name__}); "
                         "was it trained with other --latent-dim / --conditional / --architecture / "
                         "--generator-average options (see its config.json), or by an older digitgan? "
                         "Use those, or a new --run-dir") from None
    except (tf.errors.OpError, IndexError, OSError) as error:  # TF reports a short read as IndexError
        return f"unreadable ({type(error).__name__}: {_first_line(error)})"
    non_finite = state.non_finite_variables()
    if non_finite:
        return f"holds NaN/inf in {len(non_finite)} variable(s), e.g. {non_finite[0]}"
    return None


def _checkpoint_candidates(directory: Path) -> list[str]:
    """Checkpoint prefixes in `directory`, newest first.

    The `checkpoint` state file decides, as for TensorFlow: it is updated (atomically) only after a
    checkpoint is completely written, so a save cut short is never listed. When that file is
    missing or unreadable but checkpoints exist, every `<prefix>.index` found is listed instead,
    highest step first, so they are not silently ignored.
    """
    state = tf.train.get_checkpoint_state(str(directory)) if directory.is_dir() else None
    if state is not None and state.all_model_checkpoint_paths:
        listed = [state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]
        return list(dict.fromkeys(listed))
    prefixes = [index.with_suffix("") for index in directory.glob("*.index")] if directory.is_dir() else []
    return [str(prefix) for prefix in sorted(prefixes, key=_checkpoint_number, reverse=True)]


def _checkpoint_number(prefix: Path) -> int:
    number = prefix.name.rpartition("-")[2]
    return int(number) if number.isdigit() else -1


def _first_line(error: BaseException) -> str:
    """The error's first line, without TensorFlow's `{{function_node ...}}` and `[Op:...]` decorations."""
    lines = str(error).strip().splitlines()
    line = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", lines[0]) if lines else ""
    return line[:300]


def _remove_partial_saves(directory: Path, report: Callable[[str], None]) -> None:
    """Deletes what saves cut short (kill -9, power loss) left in `directory`, this process's own checkpoint folder.

    TensorFlow writes a save as `<prefix>_temp/` shards and `*.tempstate*` / `checkpoint.tmp*`
    files, renamed into place when complete; a killed save leaves them behind, and later saves do
    not remove them (a leftover file keeps the `_temp` folder from being deleted). Each can be as
    large as a checkpoint, and no checkpoint refers to them.
    """
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.is_dir() and path.name.endswith("_temp"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and (".tempstate" in path.name or path.name.startswith("checkpoint.tmp")):
            path.unlink(missing_ok=True)
        else:
            continue
        report(f"Removed {path.name}: left by a checkpoint save that was cut short")


def _save(manager: tf.train.CheckpointManager, state: step_lib.GanState, step: int) -> None:
    """Saves a checkpoint at `step`, unless a variable turned NaN/inf (then the last good one stays the newest).

    The loss check alone misses this: a call's losses are computed before its last update, which
    can be the one that broke the weights.
    """
    non_finite = state.non_finite_variables()
    if non_finite:
        raise NonFiniteLossError(f"{len(non_finite)} variable(s) became NaN/inf by step {step} "
                                 f"(e.g. {non_finite[0]}) and were not saved; {_divergence_advice(manager)}")
    manager.save(checkpoint_number=step)


def _divergence_advice(manager: tf.train.CheckpointManager) -> str:
    if manager.latest_checkpoint is None:
        return "no checkpoint was saved yet: lower --learning-rate or use --precision float32"
    return (f"the last good checkpoint ({manager.latest_checkpoint}) is intact: lower --learning-rate "
            "or use --precision float32, then rerun to resume from it")


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


class EpochQuality:
    """Cheap per-epoch figures for TensorBoard: the MNIST judge on a fixed sample of 100 images per digit.

    Figures from 1,000 samples: the Fréchet ratio is biased upwards against `cli.py evaluate`'s
    10,000-sample figure, but comparable from epoch to epoch, which is what a curve needs.
    """

    PER_DIGIT = 100

    def __init__(self, config: TrainConfig, mnist: data.Mnist, report: Callable[[str], None]):
        from quality import judge as judge_lib

        self._judge_lib = judge_lib
        self.judge = judge_lib.load_judge()  # the shipped judge: figures compare across machines and runs
        self.reference = judge_lib.reference(self.judge, mnist)
        count = models.NUM_CLASSES * self.PER_DIGIT
        # Its own noise stream ([seed, 1]), so the judged sample never overlaps the sample grid's noise.
        noise = np.random.default_rng([config.seed, 1]).standard_normal((count, config.latent_dim))
        self.noise = tf.constant(noise, tf.float32)
        self.digits = np.repeat(np.arange(models.NUM_CLASSES, dtype=np.int32), self.PER_DIGIT)

    def log(self, generator, conditional: bool, step: int) -> str:
        """Judges the fixed sample, writes `quality/*` scalars at `step`, returns a one-line summary."""
        images = np.clip((sample_images(generator, self.noise, tf.constant(self.digits), conditional) + 1.0) / 2.0, 0.0, 1.0)
        requested = self.digits if conditional else None
        row = self._judge_lib.judge_images(self.judge, self.reference, f"step {step}",
                                           images if conditional else None, requested, images)
        tf.summary.scalar("quality/mnist_score", row.mnist_score, step=step)
        tf.summary.scalar("quality/frechet_ratio", row.frechet_ratio, step=step)
        line = f"  quality on {len(images)} samples: MNIST score {row.mnist_score:.2f}, Fréchet ratio {row.frechet_ratio:.2f}"
        if row.conditional_accuracy is not None:
            tf.summary.scalar("quality/conditional_accuracy", row.conditional_accuracy, step=step)
            line += f", conditional accuracy {row.conditional_accuracy:.2%}"
        return line


def _epoch_quality(config: TrainConfig, mnist: data.Mnist, report: Callable[[str], None]) -> "EpochQuality | bool":
    """The per-epoch judge, or False when it cannot be had (its weights missing or changed): the
    figures are a nicety, so that turns them off with one line, never stops training."""
    try:
        return EpochQuality(config, mnist, report)
    except (ValueError, OSError) as error:
        report(f"Per-epoch quality figures are off for this run: {error}")
        return False


def _log_quality(quality: EpochQuality, generator, conditional: bool, step: int,
                 report: Callable[[str], None]) -> "EpochQuality | bool":
    """Logs the epoch's figures; returns `quality` to reuse, or False when judging failed."""
    try:
        report(quality.log(generator, conditional, step))
        return quality
    except (ValueError, OSError) as error:
        report(f"  quality figures turned off for this run: {error}")
        return False


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
