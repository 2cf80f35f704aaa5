"""bench/time_to_quality.py's recipes and arguments: what `previous_default` trains in, and what it refuses.

The end-to-end smoke run is tests/quality/test_time_to_quality_smoke.py.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from trainer import strategy as strategy_lib

REPO = Path(__file__).resolve().parents[2]
INTEL_AVX512_BF16 = "vendor_id : GenuineIntel\nflags : fpu avx2 avx512f avx512_bf16 avx512_vnni"
INTEL_AMX = "vendor_id : GenuineIntel\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile"
AMD_AVX2 = "vendor_id : AuthenticAMD\nflags : fpu avx2"


@pytest.fixture(scope="module")
def time_to_quality():
    spec = importlib.util.spec_from_file_location("time_to_quality", REPO / "bench" / "time_to_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cpu_info, then, today", [
    (INTEL_AVX512_BF16, "mixed_bfloat16", "float32"),  # the old rule took the slower precision here
    (INTEL_AMX, "mixed_bfloat16", "mixed_bfloat16"),  # both rules agree: previous_default == previous_default_auto
    (AMD_AVX2, "float32", "float32"),
])
def test_previous_default_trains_in_the_precision_auto_chose_then(time_to_quality, monkeypatch, cpu_info, then, today):
    monkeypatch.setattr(strategy_lib, "_read_cpu_info", lambda: cpu_info)
    assert time_to_quality.previous_auto_precision() == then
    assert strategy_lib.resolve_precision("auto", tf.distribute.get_strategy()) == today


def test_previous_default_spells_out_every_recipe_field_that_changed(time_to_quality):
    from trainer.config import TrainConfig
    previous = TrainConfig(**time_to_quality.PREVIOUS_DEFAULT)
    today = TrainConfig()
    assert (previous.epochs, previous.architecture, previous.classifier_weight) == (8, "tutorial_cbn", 0.15)
    assert previous != today  # so the bench compares two recipes, not one twice


def test_set_overrides_parse_as_json_and_reject_a_pair_without_equals(time_to_quality):
    assert time_to_quality.parse_overrides(["epochs=8", "architecture=tutorial_cbn", "xla=true"]) == {
        "epochs": 8, "architecture": "tutorial_cbn", "xla": True}
    with pytest.raises(ValueError, match="KEY=VALUE, got 'epochs'"):
        time_to_quality.parse_overrides(["epochs"])


@pytest.mark.slow  # starts the script in a subprocess (TensorFlow's import: seconds)
def test_a_non_empty_run_root_is_refused_with_exit_code_2_and_left_untouched(tmp_path):
    earlier = tmp_path / "default" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "checkpoint").write_text("an earlier run")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "time_to_quality.py"), "--recipes", "default",
                             "--run-root", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--run-root {tmp_path} is not empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["checkpoint", "checkpoints", "default"]
