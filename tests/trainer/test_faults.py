"""Training under faults, with real `cli.py train` subprocesses, real checkpoints and real MNIST (no mocks).

- a SIGTERM first, which saves the step reached and exits with 128 + 15; then kill -9 at seeded
  random steps, once in the middle of a checkpoint write (that trainer runs behind a hook that
  stops it there, STOP_IN_A_WRITE): every restart resumes from the newest complete checkpoint and
  cleans up the cut-short save;
- then the two newest checkpoints are damaged (garbled bytes; NaN in a weight): the last restart
  reports and skips them, resumes from the third, and the run still ends with exactly the weights
  of an uninterrupted run, so every step trained on the batches it should (data order across
  resumes) and nothing half-written, garbled or NaN was used;
- no usable checkpoint at all stops the run with one line and exit code 2, touching nothing;
- a real NaN (float16 overflow at an absurd learning rate) stops the run with one line and exit
  code 2, and the last good checkpoint stays restorable and finite.

Training on CPU is deterministic for a seed, and resuming is exact (trainer/checkpoints.py): that is what
lets an interrupted run be compared bit for bit with an uninterrupted one.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import cli
from tests.conftest import REPO
from trainer import step as step_lib, strategy as strategy_lib
from trainer.config import TrainConfig

MAX_STEPS = 20
SEED = 3
INTERRUPTIONS = 4  # a SIGTERM, then kill -9s, one of which lands in a checkpoint write
# A tiny run: 2 replicas, one step per call and a checkpoint every 2 steps, so kills land anywhere.
# With D's dropout (the default has none): its per-replica masks are random state a resume must restore too.
RUN = dict(batch_size=16, cpu_replicas=2, steps_per_call=1, checkpoint_every_steps=2, seed=SEED, discriminator_dropout=0.3)
CLI_RUN = ["--cpu-replicas", "2", "--set", "batch_size=16", "--set", "steps_per_call=1", "--set", "checkpoint_every_steps=2",
           "--set", f"seed={SEED}", "--set", "discriminator_dropout=0.3"]
# What TensorFlow writes before a save is complete: `<prefix>_temp/` (the shards), `*.tempstate*`
# (a file before its rename) and `checkpoint.tmp*` (the state file before its rename).
PARTIAL_WRITE = re.compile(r"_temp$|tempstate|^checkpoint\.tmp")
WAIT_SECONDS = 600  # generous: the 2-core CI machine also runs other tests
# `python -c STOP_IN_A_WRITE cli.py train ...`: the trainer stops itself (SIGSTOP) once a save's shards
# are on disk and before TensorFlow merges them into place, and says so; the kill then lands mid-write.
STOPPED_IN_A_WRITE = "test hook: stopped in a checkpoint write"
STOP_IN_A_WRITE = f"""
import os, runpy, signal, sys
from common import quiet
quiet.install()
from tensorflow.python.ops import gen_io_ops
merge = gen_io_ops.merge_v2_checkpoints
def stop_then_merge(*arguments, **keywords):
    print({STOPPED_IN_A_WRITE!r}, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    return merge(*arguments, **keywords)
gen_io_ops.merge_v2_checkpoints = stop_then_merge
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

runner = CliRunner()


class TrainerProcess:
    """`python cli.py train` in a child process; a thread collects everything it prints."""

    def __init__(self, run_dir: Path, data_dir: str, stop_in_a_write: bool = False):
        hook = ["-c", STOP_IN_A_WRITE] if stop_in_a_write else []
        command = [sys.executable, *hook, str(REPO / "cli.py"), "train", "--run-dir", str(run_dir),
                   "--data-dir", data_dir, "--set", f"max_steps={MAX_STEPS}", *CLI_RUN]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            self._chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def shown_step(self) -> int:
        """The highest step the progress bar has shown ("N/MAX_STEPS"); -1 before the bar appears."""
        return max((int(count) for count in re.findall(rf"\b(\d+)/{MAX_STEPS}\b", self.output)), default=-1)

    def resumed_from(self) -> int:
        """The step printed in "Resumed from step N"; 0 when the run started afresh."""
        found = re.search(r"Resumed from step (\d+)", self.output)
        return int(found.group(1)) if found else 0

    def wait_until(self, condition: Callable[[], bool], what: str, poll_seconds: float = 0.02) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            assert self.process.poll() is None, f"the trainer exited before {what}:\n{self.output}"
            assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{self.output}"
            time.sleep(poll_seconds)

    def wait_stopped(self) -> None:
        """Waits until every thread has stopped (SIGSTOP), so the files on disk stay as they are."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        self.wait_until(lambda: all(_task_state(task) in "Tt" for task in tasks.iterdir()), "the trainer to stop")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no handler, no final save
        self.process.wait()
        self._reader.join()

    def finish(self) -> int:
        self.process.wait(timeout=WAIT_SECONDS)
        self._reader.join()
        return self.process.returncode


def _task_state(task: Path) -> str:
    try:
        return task.joinpath("stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "T"  # the thread has exited: nothing left to stop


def partial_writes(checkpoint_dir: Path) -> list[str]:
    """Files of a checkpoint save that has not finished (or was cut short)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(name for name in os.listdir(checkpoint_dir) if PARTIAL_WRITE.search(name))


def listed_checkpoints(checkpoint_dir: Path) -> list[str]:
    """The checkpoints that the `checkpoint` state file lists, oldest first."""
    state = tf.train.get_checkpoint_state(str(checkpoint_dir))
    return list(state.all_model_checkpoint_paths) if state else []


def checkpoint_step(prefix: str | None) -> int:
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def kill_at_step(trainer: TrainerProcess, step: int) -> None:
    trainer.wait_until(lambda: trainer.shown_step() >= step, f"step {step}")
    trainer.kill()


def kill_during_checkpoint_write(trainer: TrainerProcess, checkpoint_dir: Path) -> list[str]:
    """SIGKILLs a trainer started behind STOP_IN_A_WRITE, once it has stopped in its first checkpoint
    write; returns the save's temporary files left on disk."""
    trainer.wait_until(lambda: STOPPED_IN_A_WRITE in trainer.output, "a checkpoint write")
    trainer.wait_stopped()
    left = partial_writes(checkpoint_dir)
    assert left, f"the trainer stopped in a checkpoint write, but no partial save is on disk:\n{trainer.output}"
    trainer.kill()
    return left


def garble(path: Path) -> None:
    """Flips 64 bytes in the middle of the file (the size stays the same)."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = bytes(byte ^ 0xFF for byte in content[middle:middle + 64])
    path.write_bytes(bytes(content))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _state(precision: str = "float32") -> tuple[step_lib.GanState, tf.train.Checkpoint]:
    """A fresh training state with the test runs' options (built in this process, not trained)."""
    config = TrainConfig(precision=precision, **RUN)
    state = step_lib.set_globals_and_build_state(config, strategy_lib.create_strategy(None, config.cpu_replicas))
    return state, state.checkpoint()


def poison_with_nan(prefix: str) -> None:
    """Rewrites checkpoint `prefix` with NaN in one BatchNorm statistic, as a diverged run could have saved it.

    The training step uses batch statistics, not this one, so the loss would stay finite: only a
    check of the restored values catches it.
    """
    state, checkpoint = _state()
    checkpoint.restore(prefix).assert_existing_objects_matched()
    variance = state.generator.get_layer("up1_norm").moving_variance
    variance.assign(np.full(variance.shape, np.nan, np.float32))
    checkpoint.write(prefix)


def damage_two_newest(checkpoint_dir: Path) -> tuple[str, str, str]:
    """Garbles the newest listed checkpoint's data and puts a NaN into the next one; returns all three."""
    listed = listed_checkpoints(checkpoint_dir)
    assert len(listed) == 3, listed
    oldest, older, newest = listed
    garble(Path(newest + ".data-00000-of-00001"))
    poison_with_nan(older)
    return newest, older, oldest


def checkpoint_tensors(prefix: str) -> dict[str, np.ndarray]:
    """Every saved tensor but the save counter (which counts saves, not training)."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH"))}


def assert_same_training(prefix: str, reference_prefix: str) -> None:
    ours, reference = checkpoint_tensors(prefix), checkpoint_tensors(reference_prefix)
    assert ours.keys() == reference.keys()
    differing = [name for name in reference if not np.array_equal(ours[name], reference[name])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"


@pytest.fixture
def start_trainer(mnist_data_dir):
    """Starts `cli.py train` processes; any still running (or frozen) when the test ends is killed."""
    started: list[TrainerProcess] = []

    def start(run_dir: Path, stop_in_a_write: bool = False) -> TrainerProcess:
        started.append(TrainerProcess(run_dir, mnist_data_dir, stop_in_a_write))
        return started[-1]

    yield start
    for trainer in started:
        if trainer.process.poll() is None:
            trainer.kill()


def stop_with_sigterm(trainer: TrainerProcess, step: int) -> int:
    """SIGTERMs the trainer once it has trained to `step` (its handler is in place by then); returns
    the step it says it saved and stopped at."""
    trainer.wait_until(lambda: trainer.shown_step() >= step, f"step {step}")
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.finish() == 128 + signal.SIGTERM, trainer.output
    stopped = re.search(r"Stopped by signal 15 at step (\d+); checkpoint saved", trainer.output)
    assert stopped, trainer.output
    return int(stopped.group(1))


def interrupt_somewhere(trainer: TrainerProcess, checkpoint_dir: Path, how: str, step: int) -> tuple[str, list[str]]:
    """Stops the trainer by SIGTERM at `step`, or kills it in a checkpoint write or at `step`; returns
    where, and the partial save files left."""
    if how == "sigterm":
        stopped = stop_with_sigterm(trainer, step)
        assert newest_complete_step(checkpoint_dir) == stopped and partial_writes(checkpoint_dir) == []
        return f"by SIGTERM at step {stopped}, which it saved", []
    if how == "write":
        left = kill_during_checkpoint_write(trainer, checkpoint_dir)
        return f"during a checkpoint write ({', '.join(left)} on disk)", left
    kill_at_step(trainer, step)
    left = partial_writes(checkpoint_dir)
    return f"at step {step}" + (f", mid-write ({', '.join(left)})" if left else ""), left


def newest_complete_step(checkpoint_dir: Path) -> int:
    """The step of the newest checkpoint the state file lists, after checking that all it lists are complete."""
    listed = listed_checkpoints(checkpoint_dir)
    for prefix in listed:
        assert Path(prefix + ".index").is_file() and Path(prefix + ".data-00000-of-00001").is_file(), prefix
    return checkpoint_step(listed[-1] if listed else None)


def assert_resumed(trainer: TrainerProcess, expected_step: int, left: list[str]) -> None:
    """The restart resumed from `expected_step` and removed what the cut-short save left."""
    trainer.wait_until(lambda: trainer.shown_step() >= 0, "the progress bar")
    assert trainer.resumed_from() == expected_step, trainer.output
    for name in left:
        assert f"Removed {name}: left by a checkpoint save that was cut short" in trainer.output


@pytest.mark.slow
def test_sigterm_kill_9_and_damaged_checkpoints_still_end_like_an_uninterrupted_run(tmp_path, start_trainer):
    reference = start_trainer(tmp_path / "reference")  # runs alongside, never interrupted
    checkpoint_dir = tmp_path / "faulted" / "checkpoints"
    random_points = random.Random(SEED)
    # A SIGTERM first (early, so the run cannot finish before it lands), then kill -9s; a seeded one waits for a write.
    kills = ["step"] * (INTERRUPTIONS - 1)
    kills[random_points.randrange(len(kills))] = "write"
    report, resumed, left = [], 0, []
    for number, how in enumerate(["sigterm", *kills], start=1):
        trainer = start_trainer(tmp_path / "faulted", stop_in_a_write=how == "write")
        # The newest checkpoint listed when the previous run died: never older, never the cut-short save.
        assert_resumed(trainer, resumed, left)
        target = min(resumed + random_points.randint(1, 5), MAX_STEPS - 1)
        where, left = interrupt_somewhere(trainer, checkpoint_dir, how, target)
        resumed = newest_complete_step(checkpoint_dir)
        report.append(f"interruption {number} {where}: progress showed step {trainer.shown_step()}, "
                      f"newest listed checkpoint step {resumed}")
    newest, older, oldest = damage_two_newest(checkpoint_dir)
    trainer = start_trainer(tmp_path / "faulted")
    assert_resumed(trainer, checkpoint_step(oldest), left)
    assert trainer.finish() == 0, trainer.output
    assert f"Skipping checkpoint {newest}: unreadable (DataLossError" in trainer.output
    assert f"Skipping checkpoint {older}: holds NaN/inf" in trainer.output
    assert f"Done: step {MAX_STEPS}" in trainer.output
    assert "during a checkpoint write" in "\n".join(report) and partial_writes(checkpoint_dir) == []
    assert reference.finish() == 0, reference.output
    final = tf.train.latest_checkpoint(str(checkpoint_dir))
    assert final.endswith(f"ckpt-{MAX_STEPS}")
    assert_same_training(final, tf.train.latest_checkpoint(str(tmp_path / "reference" / "checkpoints")))
    print("\n".join(["", *report, f"damaged {Path(newest).name} (garbled) and {Path(older).name} (NaN); "
                     f"resumed from step {checkpoint_step(oldest)}; finished at step {MAX_STEPS}, "
                     "bit-identical to the uninterrupted run"]))


def _save_untrained_checkpoints(checkpoint_dir: Path, steps: tuple[int, ...]) -> None:
    state, checkpoint = _state()
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=len(steps))
    for step in steps:
        state.step.assign(step)
        manager.save(checkpoint_number=step)


def test_no_usable_checkpoint_stops_with_one_line_and_touches_nothing(tmp_path, mnist_data_dir):
    checkpoint_dir = tmp_path / "checkpoints"
    _save_untrained_checkpoints(checkpoint_dir, (2, 4, 6))
    (checkpoint_dir / "checkpoint").write_text("not a checkpoint state {")  # the list of checkpoints is garbled too
    for data_file in checkpoint_dir.glob("*.data-*"):
        truncate(data_file)
    before = {path.name: path.read_bytes() for path in checkpoint_dir.iterdir()}
    result = runner.invoke(cli.app, ["train", "--run-dir", str(tmp_path), "--data-dir", mnist_data_dir,
                                     "--set", "max_steps=8", *CLI_RUN])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "none of the 3 checkpoint(s)" in errors[0] and "Read less bytes than requested" in errors[0]
    assert {path.name: path.read_bytes() for path in checkpoint_dir.iterdir()} == before  # nothing trained or saved


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, mnist_data_dir):
    # An absurd learning rate, no momentum and float16: activations overflow within a few dozen steps.
    diverging = ["--set", "precision=mixed_float16", "--set", "learning_rate=0.99", "--set", "beta_1=0", "--set", "max_steps=200"]
    result = runner.invoke(cli.app, ["train", "--run-dir", str(tmp_path), "--data-dir", mnist_data_dir,
                                     *CLI_RUN, *diverging])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    # The divergence shows first either in the loss or in the weights checked before a save.
    found = re.search(r"(?:loss became non-finite at|variable\(s\) became NaN/inf by) step (\d+) "
                      r".*the last good checkpoint \((\S+)\) is intact", errors[0])
    assert found, errors[0]
    nan_step, last_good = int(found.group(1)), found.group(2)
    assert last_good == tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert checkpoint_step(last_good) < nan_step
    state, checkpoint = _state(precision="mixed_float16")
    checkpoint.restore(last_good).assert_existing_objects_matched()
    assert state.non_finite_variables() == []
    print(f"\nNaN loss at step {nan_step}; last good checkpoint {Path(last_good).name}, restorable and finite")
