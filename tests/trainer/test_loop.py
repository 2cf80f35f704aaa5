"""The training loop: checkpoints, exact resume, signals, samples, config.json."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import REPO
from trainer import loop
from trainer.config import TrainConfig


def _config(run_dir, data_dir, **overrides) -> TrainConfig:
    values = dict(run_dir=str(run_dir), data_dir=data_dir, batch_size=16, cpu_replicas=2, steps_per_call=2,
                  checkpoint_every_steps=2)
    return TrainConfig(**{**values, **overrides})


@pytest.mark.slow
def test_resume_continues_at_the_saved_step(tmp_path, mnist_data_dir):
    lines = []
    first = loop.train(_config(tmp_path, mnist_data_dir, max_steps=4), report=lines.append, progress=False)
    assert first.step == 4 and first.checkpoint.endswith("ckpt-4")
    second = loop.train(_config(tmp_path, mnist_data_dir, max_steps=6), report=lines.append, progress=False)
    assert any(line.startswith("Resumed from step 4") for line in lines)
    assert second.step == 6
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_steps"] == 6 and saved["cpu_replicas"] == 2
    # The default precision "auto" is recorded as what it resolved to on this machine.
    assert saved["precision"] in ("float32", "mixed_bfloat16")
    assert any(line.startswith(f"Precision: {saved['precision']} (auto") for line in lines)
    assert list((tmp_path / "samples").glob("step_*.png")), "a sample grid is written when a run ends mid-epoch"
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_no_resume_refuses_to_touch_existing_checkpoints(tmp_path, mnist_data_dir):
    loop.train(_config(tmp_path, mnist_data_dir, max_steps=2), report=lambda line: None, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        loop.train(_config(tmp_path, mnist_data_dir, max_steps=4, resume=False), report=lambda line: None, progress=False)


@pytest.mark.slow
def test_other_architecture_checkpoint_is_refused(tmp_path, mnist_data_dir):
    loop.train(_config(tmp_path, mnist_data_dir, max_steps=2), report=lambda line: None, progress=False)
    with pytest.raises(ValueError, match="does not match this model"):
        loop.train(_config(tmp_path, mnist_data_dir, max_steps=4, latent_dim=64), report=lambda line: None, progress=False)


def _start_training(run_dir: Path, data_dir: str) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "cli.py"), "train", "--run-dir", str(run_dir), "--data-dir", data_dir,
               "--cpu-replicas", "2", "--set", "batch_size=16", "--set", "steps_per_call=1", "--set", "checkpoint_every_steps=3",
               "--set", "max_steps=100000"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, minimum_step: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
        if latest and int(latest.rsplit("-", 1)[1]) >= minimum_step:
            return int(latest.rsplit("-", 1)[1])
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_sigkill_loses_only_unsaved_steps(tmp_path, mnist_data_dir):
    process = _start_training(tmp_path, mnist_data_dir)
    _wait_for_checkpoint(tmp_path, process, minimum_step=3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    stopped_at = int(output.split("Stopped by signal 15 at step ")[1].split(";")[0])
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith(f"ckpt-{stopped_at}")

    process = _start_training(tmp_path, mnist_data_dir)
    last_saved = _wait_for_checkpoint(tmp_path, process, minimum_step=stopped_at + 3)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    last_saved = int(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).rsplit("-", 1)[1])
    assert last_saved >= stopped_at + 3
    lines = []
    result = loop.train(_config(tmp_path, mnist_data_dir, max_steps=last_saved + 1, steps_per_call=1),
                        report=lines.append, progress=False)
    assert f"Resumed from step {last_saved}" in "\n".join(lines)
    assert result.step == last_saved + 1
