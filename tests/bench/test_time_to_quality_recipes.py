"""`python -m bench.time_to_quality`'s recipes and arguments: what `previous_default` trains in, and what it refuses.

The end-to-end smoke run is tests/bench/test_time_to_quality_smoke.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf

from trainer import strategy as strategy_lib

REPO = Path(__file__).resolve().parents[2]
INTEL_AVX512_BF16 = "vendor_id : GenuineIntel\nflags : fpu avx2 avx512f avx512_bf16 avx512_vnni"
INTEL_AMX = "vendor_id : GenuineIntel\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile"
AMD_AVX2 = "vendor_id : AuthenticAMD\nflags : fpu avx2"
# Both rules answer float32 for a run on GPUs, whatever the CPU has.
cpu_only = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="auto is float32 on GPUs")


@pytest.fixture(scope="module")
def time_to_quality():
    from bench import time_to_quality

    return time_to_quality


@cpu_only
@pytest.mark.parametrize("cpu_info, then, today", [
    (INTEL_AVX512_BF16, "mixed_bfloat16", "float32"),  # the old rule took the slower precision here
    (INTEL_AMX, "mixed_bfloat16", "mixed_bfloat16"),  # both rules agree: previous_default == previous_default_auto
    (AMD_AVX2, "float32", "float32"),
])
def test_previous_default_trains_in_the_precision_auto_chose_then(time_to_quality, monkeypatch, cpu_info, then, today):
    monkeypatch.setattr(strategy_lib, "_read_cpu_info", lambda: cpu_info)
    assert time_to_quality.previous_auto_precision() == then
    assert time_to_quality.recipe_fields("previous_default", {})["precision"] == then
    assert "precision" not in time_to_quality.recipe_fields("previous_default_auto", {})  # today's auto
    assert strategy_lib.resolve_precision("auto", tf.distribute.get_strategy()) == today


def test_previous_default_is_a_different_recipe_from_today(time_to_quality):
    from trainer.config import TrainConfig
    previous = TrainConfig(**time_to_quality.recipe_fields("previous_default_auto", {}))
    today = TrainConfig(**time_to_quality.recipe_fields("default", {}))
    assert (previous.epochs, previous.architecture, previous.classifier_weight) == (8, "tutorial_cbn", 0.15)
    assert previous != today  # so the bench compares two recipes, not one twice


def test_previous_default_spells_out_every_recipe_field(time_to_quality):
    """A field left out would follow today's default, so the old recipe would change with it."""
    from trainer.config import TrainConfig, recipe
    learned = set(recipe(TrainConfig())) - {"max_steps", "seed"}  # how long and which seed: the bench's choice
    spelled_out = set(time_to_quality.recipe_fields("previous_default_auto", {}))
    assert learned <= spelled_out, learned - spelled_out


def test_set_changes_only_the_default_recipe_and_a_pair_without_equals_is_refused(time_to_quality, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(sys, "argv", ["time_to_quality", "--set", "epochs=3", "--set", "architecture=tutorial_cbn",
                                      "--set", "xla=true"])
    settings = time_to_quality.parse_arguments().settings
    assert settings == {"epochs": 3, "architecture": "tutorial_cbn", "xla": True}
    assert time_to_quality.recipe_fields("default", settings) == settings
    assert time_to_quality.recipe_fields("tutorial", settings)["epochs"] == time_to_quality.BUDGET_EPOCHS
    assert time_to_quality.recipe_fields("previous_default_auto", settings)["epochs"] == 8  # its own, not --set's
    monkeypatch.setattr(sys, "argv", ["time_to_quality", "--set", "epochs"])
    with pytest.raises(SystemExit) as refused:
        time_to_quality.parse_arguments()
    assert refused.value.code == 2
    assert "FIELD=VALUE, like epochs=3; got 'epochs'" in capsys.readouterr().err


@pytest.mark.slow  # starts the script in a subprocess (TensorFlow's import: seconds)
def test_a_non_empty_run_root_is_refused_with_exit_code_2_and_left_untouched(tmp_path):
    earlier = tmp_path / "default" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "checkpoint").write_text("an earlier run")
    result = subprocess.run([sys.executable, "-m", "bench.time_to_quality", "--recipes", "default",
                             "--run-root", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--run-root {tmp_path} is not empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["checkpoint", "checkpoints", "default"]


def test_a_recipe_process_ended_by_ctrl_c_stops_the_bench_with_one_line(time_to_quality, monkeypatch, tmp_path, capsys):
    """The recipe's process can exit (130) before the bench handles its own copy of the Ctrl-C."""
    class EndedByCtrlC:  # stands in for the recipe's process: no need to train to see how its end is read
        def __init__(self, command, **options):
            self.command = command

        def wait(self):
            return time_to_quality.INTERRUPTED

        def kill(self):
            raise AssertionError("the process had ended; nothing to kill")

    monkeypatch.setattr(time_to_quality.subprocess, "Popen", EndedByCtrlC)
    with pytest.raises(SystemExit) as stop:
        time_to_quality.recipe_in_own_process("default", tmp_path)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted during recipe default\n"


@pytest.mark.slow  # trains in a subprocess until its first checkpoint
def test_ctrl_c_saves_the_recipe_checkpoint_and_ends_with_one_line(mnist_data_dir, tmp_path):
    command = [sys.executable, "-m", "bench.time_to_quality", "--recipes", "default", "--data-dir", mnist_data_dir,
               "--run-root", str(tmp_path), "--set", "checkpoint_every_steps=2"]  # a first checkpoint within seconds
    # A session of its own, so the Ctrl-C reaches the bench and its recipe process, as a terminal's would.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    checkpoint_index = tmp_path / "default" / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    while not checkpoint_index.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # polls for the first checkpoint, the event to interrupt after
    assert checkpoint_index.exists(), process.communicate(timeout=60)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted during recipe default" in stderr and "Traceback" not in stderr, stderr[-2000:]
    saved = [int(path.name.split("-")[1].split(".")[0]) for path in checkpoint_index.parent.glob("ckpt-*.index")]
    # The stop saves the step it reached (the periodic checkpoint at 2 when it stopped right there),
    # and the recipe is not judged or continued after it.
    assert saved and max(saved) >= 2, saved
    assert "default after" not in stdout, stdout[-2000:]


def test_the_default_is_timed_against_each_former_default_but_not_the_tutorial(time_to_quality, capsys):
    from quality import judge as judge_lib

    def rows(seconds):
        return [(seconds, judge_lib.QualityReport(source="a recipe", samples=10, mnist_score=9.0,
                                                  frechet_distance=1.0, frechet_ratio=2.0, judge="small"))]

    calibration = judge_lib.QualityReport(source="real test split vs real train", samples=10, mnist_score=9.7,
                                          frechet_distance=0.5, frechet_ratio=1.0, judge="small")
    time_to_quality.print_side_by_side([calibration], {"tanh_default": rows(310.0), "default": rows(300.0),
                                                       "previous_default": rows(600.0), "tutorial": rows(600.0)})
    ratios = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training seconds")]
    assert ratios == ["training seconds: default 300 s, tanh_default 310 s: 0.97x",
                      "training seconds: default 300 s, previous_default 600 s: 0.50x"]
