"""The training loop: checkpoints, exact resume, samples, config.json (signals: tests/trainer/test_faults.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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


def _copy_of(run_dir: str, tmp_path: Path) -> Path:
    """A copy of a trained run (tiny_runs are shared by the whole session)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.slow
def test_no_resume_refuses_to_touch_existing_checkpoints(tiny_runs, tmp_path, mnist_data_dir):
    run_dir = _copy_of(tiny_runs["conditional"], tmp_path)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match="already holds checkpoints"):
        loop.train(_config(run_dir, mnist_data_dir, max_steps=6, precision="float32", resume=False),
                   report=lambda line: None, progress=False)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_other_architecture_checkpoint_is_refused(tiny_runs, tmp_path, mnist_data_dir):
    run_dir = _copy_of(tiny_runs["conditional"], tmp_path)
    with pytest.raises(ValueError, match="does not match this model"):
        loop.train(_config(run_dir, mnist_data_dir, max_steps=6, precision="float32", latent_dim=64),
                   report=lambda line: None, progress=False)
