"""Smoke runs of the speed benchmarks: each script runs end to end on a tiny budget and prints
every row and verdict it is read for, and its figures as one JSON line for scripts, so a change
that breaks a bench fails here.

No figure is asserted beyond "measured and positive": the machines are noisy, and the benches
report ratios for people to read (bench/README.md), not pass/fail timings.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import strategy as strategy_lib

pytestmark = pytest.mark.slow  # each starts a benchmark subprocess (and servers): minutes, not seconds

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"([\d.]+)"


def run_bench(*arguments: str) -> str:
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def json_figures(output: str, bench: str) -> dict:
    """The bench's last line, parsed: {"bench": name, ...its figures}."""
    figures = json.loads(output.strip().splitlines()[-1])
    assert figures["bench"] == bench, figures
    return figures


def test_serving_latency_smoke_prints_every_cell_the_bound_and_the_targets():
    output = run_bench("-m", "bench.serving_latency", "--seconds", "0.3")
    for label in ("in-process TF1 Session, 2 threads, 16 img", "gRPC batching off,  1 img, 16 clients",
                  "gRPC batching on ,  1 img, 16 clients", "gRPC, no model (transport floor),  1 img, 16 clients",
                  "v2 gRPC ModelInfer, batching off, 1 img, 1 client", "v2 REST infer, batching off, 1 img, 1 client"):
        row = re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+(\d+)$", output, re.M)
        assert row, f"no row {label!r} in:\n{output[-3000:]}"
        assert float(row.group(3)) > 0 and int(row.group(5)) > 0, row.group(0)
    for kind in ("unbatched", "batched"):
        bound = re.search(rf"upper bound, 16 clients x 1 img, {kind}\s+{NUMBER} req/s", output)
        assert bound and float(bound.group(1)) > 0, output[-2000:]
    for target in ("gRPC p50 within in-process p50 + 1 ms", "batched >= 3x unbatched rps",
                   "batched >= 70% of in-process batched throughput"):
        assert re.search(rf"{re.escape(target)}.*: +(met|NOT met) \(", output), f"no verdict for {target!r}"
    figures = json_figures(output, "serving_latency")
    assert figures["cells"]["gRPC batching on, 1 img, 16 clients"]["rps"] > 0
    assert figures["cells"]["v2 REST infer, 1 img, 1 client"]["p99"] > 0
    assert figures["cells"]["in-process TF1 Session, 2 threads, 16 img"]["ips"] > 0
    assert figures["bounds_requests_per_s"]["batched"] > 0 and len(figures["targets"]) == 3


@pytest.fixture(scope="module")
def train_throughput_output(mnist_data_dir) -> str:
    """One tiny run of bench.train_throughput, read by the two tests below."""
    return run_bench("-m", "bench.train_throughput", "--skip-eager", "--batch-size", "16",
                     "--steps", "2", "--rounds", "1", "--precision", "float32", "--data-dir", mnist_data_dir)


def test_train_throughput_smoke_prints_every_variant_and_the_kernel_bound(train_throughput_output):
    output = train_throughput_output
    for variant in ("tutorial_tf_function", "tutorial_tf_function_tfdata", "tutorial_tf_function_xla",
                    "ours_unconditional", "ours_conditional", "ours_conditional_synthetic", "ours_compact",
                    "ours_default", "ours_default_xla"):
        row = re.search(rf"^{variant}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x$", output, re.M)
        assert row and float(row.group(2)) > 0, f"no row {variant!r} in:\n{output[-3000:]}"
    assert re.search(r"input pipeline gap \(real / synthetic step time - 1\): [+-][\d.]+%", output)
    assert re.search(rf"^a step runs at least\s+{NUMBER}", output, re.M), output[-2000:]  # the kernel bound
    assert re.search(r"^2x the tutorial's float32 step means \d+ ms a step; .* need \d+ ms in (float32|mixed_bfloat16)",
                     output, re.M), output[-2000:]
    figures = json_figures(output, "train_throughput")
    assert figures["variants"]["ours_default"]["images_per_s"] > 0 and figures["kernel_bound_ms_per_step"]["float32"] > 0


@pytest.mark.skipif(not strategy_lib.has_bfloat16_instructions(),
                    reason="the CPU has no bfloat16 instructions (AVX512-BF16 or AMX): the bench times float32 only")
def test_train_throughput_smoke_shows_both_precisions_of_the_default_step(train_throughput_output):
    """Where the CPU computes bfloat16 natively, the bench times the default step in both precisions."""
    figures = json_figures(train_throughput_output, "train_throughput")
    assert {"ours_default_float32", "ours_default_mixed_bfloat16"} <= set(figures["variants"])
    assert re.search(rf"^ours_default in mixed_bfloat16 / in float32: {NUMBER}x \(above 1 means bfloat16 is faster; "
                     rf"auto chose {figures['default_precision']}\)", train_throughput_output, re.M), \
        train_throughput_output[-2000:]


def test_serving_memory_smoke_prints_the_switch_and_its_json_line():
    output = run_bench("-m", "bench.serving_memory", "--switches", "1", "--clients", "1")
    assert re.search(rf"^switch v1 -> v2: before\s+{NUMBER}\s+peak\s+{NUMBER}", output, re.M), output[-2000:]
    assert re.search(r"peak during a switch / one version: +[\d.]+x .* target < 2x: (met|NOT met)", output), output[-2000:]
    figures = json_figures(output, "serving_memory")
    assert len(figures["switch_peaks_mib"]) == 1 and figures["one_version_mib"] > 0 and figures["runtime_mib"] > 0
    assert figures["requests"] > 0


def test_cpu_kernels_smoke_measures_both_settings_in_their_own_processes(mnist_data_dir):
    output = run_bench("-m", "bench.cpu_kernels", "--rounds", "1", "--steps", "10", "--images", "1000",
                       "--data-dir", mnist_data_dir)
    for figure in ("train step (ms)", "judge small (s)", "judge wide (s)", "generate 64 (ms)", "generate 1 (ms)"):
        row = re.search(rf"^{re.escape(figure)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x$", output, re.M)
        assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, f"no row {figure!r} in:\n{output[-3000:]}"
    figures = json_figures(output, "cpu_kernels")
    assert figures["onednn_on"] == {"oneDNN": True, "TensorFlow's own": False}
