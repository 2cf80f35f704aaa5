"""Checkpoints of a run: where they go, which one a run resumes from, and what a save must not keep.

Resuming is exact: the checkpoint holds the step and every random state (noise and dropout seeds),
and the step alone fixes the epoch and the position inside it (tests/trainer/test_faults.py).

Faults: a checkpoint that cannot be read (truncated, garbled, missing files) or holds NaN/inf is
reported and skipped for the previous one; when none can be restored the run stops rather than
start over. Weights that turned non-finite are never saved.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import tensorflow as tf

from trainer import step as step_lib, strategy as strategy_lib
from trainer.config import CONFIG_FILE, TrainConfig


class NonFiniteLossError(RuntimeError):
    """The GAN diverged (a NaN or infinite loss or weights); the last good checkpoint is left untouched."""


def manager(checkpoint: tf.train.Checkpoint, config: TrainConfig,
            strategy: tf.distribute.Strategy) -> tf.train.CheckpointManager:
    """The run's checkpoint manager: the run dir's `checkpoints/` on the chief, a folder of its own elsewhere."""
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


def restore_newest(manager: tf.train.CheckpointManager, checkpoint: tf.train.Checkpoint, state: step_lib.GanState,
                   config: TrainConfig, report: Callable[[str], None]) -> int:
    """Restores the newest usable checkpoint when resuming is allowed; returns the step to continue from.

    An unreadable checkpoint (truncated, garbled, files missing) or one holding NaN/inf is reported
    and the previous one tried: a restarted job loses at most a few checkpoint intervals rather than
    crash-loop. A model mismatch, or no usable checkpoint at all, stops the run: starting over
    would silently discard the run. A non-chief worker restores the chief's checkpoints when it can
    see them (shared run dir), else its own.
    """
    candidates = _candidates(config.checkpoint_dir) or _candidates(Path(manager.directory))
    if not candidates:
        return 0
    if not config.resume:
        raise ValueError(f"run dir '{config.run_dir}' already holds checkpoints ({candidates[0]}); "
                         "pass --resume to continue it, or choose a new --run-dir")
    _check_same_image_activation(config)
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


def _check_same_image_activation(config: TrainConfig) -> None:
    """Refuses to resume a run under another image activation than it trained with: the weights
    restore all the same (the activation has none), but they would draw other pixels."""
    saved_file = Path(config.run_dir) / CONFIG_FILE
    if not saved_file.exists():
        return
    saved = TrainConfig.load(config.run_dir).image_activation  # a config.json from before the field: tanh
    if saved != config.image_activation:
        raise ValueError(f"run dir '{config.run_dir}' was trained with image_activation={saved} (its config.json), "
                         f"not {config.image_activation}; --set image_activation={saved} to resume it, "
                         "or use a new --run-dir")


def _restore_one(checkpoint: tf.train.Checkpoint, state: step_lib.GanState, path: str) -> str | None:
    """Restores `path`; returns why it is unusable, or None when the state now holds it."""
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise ValueError(f"checkpoint {path} does not match this model ({type(error).__name__}); "
                         "was it trained with another latent_dim, conditional, architecture, "
                         "generator_average_decay or discriminator_dropout (see its config.json), "
                         "or by an older digitgan? --set those, or use a new --run-dir") from None
    except (tf.errors.OpError, IndexError, OSError) as error:  # TF reports a short read as IndexError
        return f"unreadable ({type(error).__name__}: {_first_line(error)})"
    non_finite = state.non_finite_variables()
    if non_finite:
        return f"holds NaN/inf in {len(non_finite)} variable(s), e.g. {non_finite[0]}"
    return None


def _candidates(directory: Path) -> list[str]:
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
    return [str(prefix) for prefix in sorted(prefixes, key=_number, reverse=True)]


def _number(prefix: Path) -> int:
    number = prefix.name.rpartition("-")[2]
    return int(number) if number.isdigit() else -1


def _first_line(error: BaseException) -> str:
    """The error's first line, without TensorFlow's `{{function_node ...}}` and `[Op:...]` decorations."""
    lines = str(error).strip().splitlines()
    line = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", lines[0]) if lines else ""
    return line[:300]


def remove_partial_saves(directory: Path, report: Callable[[str], None]) -> None:
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


def save(manager: tf.train.CheckpointManager, state: step_lib.GanState, step: int) -> None:
    """Saves a checkpoint at `step`, unless a variable turned NaN/inf (then the last good one stays the newest).

    The loss check alone misses this: a call's losses are computed before its last update, which
    can be the one that broke the weights.
    """
    non_finite = state.non_finite_variables()
    if non_finite:
        raise NonFiniteLossError(f"{len(non_finite)} variable(s) became NaN/inf by step {step} "
                                 f"(e.g. {non_finite[0]}) and were not saved; {divergence_advice(manager)}")
    manager.save(checkpoint_number=step)


def divergence_advice(manager: tf.train.CheckpointManager) -> str:
    """What to do after a divergence, naming the last good checkpoint when there is one."""
    if manager.latest_checkpoint is None:
        return "no checkpoint was saved yet: lower the learning rate (--set learning_rate=...) or --set precision=float32"
    return (f"the last good checkpoint ({manager.latest_checkpoint}) is intact: lower the learning rate "
            "(--set learning_rate=...) or --set precision=float32, then rerun to resume from it")


def check_workers_agree(strategy: tf.distribute.Strategy, step: tf.Variable) -> None:
    """Under several workers, fails on every worker unless all of them resumed from the same step."""
    if not strategy_lib.is_multi_worker(strategy):
        return
    steps = strategy.gather(strategy.run(tf.function(lambda: tf.reshape(tf.identity(step), [1]))), axis=0).numpy()
    if len(set(steps.tolist())) > 1:
        raise ValueError(f"the workers resumed from different steps ({', '.join(map(str, steps))} per replica): "
                         "each worker must see the chief's newest checkpoint (a shared --run-dir) or hold its own "
                         "copy of it; remove the stale checkpoints or use a new --run-dir")
