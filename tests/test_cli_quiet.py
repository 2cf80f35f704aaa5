"""The CLI's output is our own: TensorFlow's start-up chatter is filtered, --verbose brings it back.

"Chatter" is what the filter is meant to hide, on any machine: TensorFlow's C++ INFO and WARNING
lines, absl's pre-initialisation notice and the two known harmless ERRORs. Which of these a run
triggers depends on the CPU (oneDNN's line, the CUDA probe); other ERROR lines are let through
on purpose, so the tests look for chatter, not for an empty stderr.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import cli
from common import cpu_kernels, quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_PREFIX = r"\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\s:]+:\d+\] "  # after the severity letter: date, time, thread, file:line]
CHATTER = re.compile(rf"^[IW]{LOG_PREFIX}|absl::InitializeLog"
                     r"|failed call to cuInit|remapper failed: INVALID_ARGUMENT: Mutation::Apply error")
TF_ERROR = re.compile(rf"^[EF]{LOG_PREFIX}")
# A C++ WARNING that TensorFlow logs on every machine: a cached tf.data pipeline read only in part.
PROBE = "list(tf.data.Dataset.range(4).cache().take(1))"
PROBE_LINE = re.compile(r"^W\d{4} .*cache_dataset_ops\.cc:\d+\] The calling iterator did not fully read", re.MULTILINE)


def _user_environment(**extra: str) -> dict:
    """The environment of a user's shell: none of the test session's log or kernel settings."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_CPP_MIN_LOG_LEVEL", quiet.VERBOSE_VARIABLE, cpu_kernels.ONEDNN_VARIABLE)}
    environment.update(extra)
    return environment


def _run(arguments: list[str], **extra: str) -> tuple[int, list[str]]:
    """Runs `python cli.py ...` like a user; returns its exit code and its stdout+stderr lines."""
    result = subprocess.run([sys.executable, "cli.py", *arguments], cwd=REPO, env=_user_environment(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return result.returncode, [line for line in re.split(r"[\r\n]", result.stdout) if line.strip()]


def _chatter(text: str) -> list[str]:
    return [line for line in text.splitlines() if CHATTER.search(line)]


def _own(lines: list[str]) -> list[str]:
    """The lines that are not TensorFlow's ERROR/FATAL lines (those the filter lets through on purpose)."""
    return [line for line in lines if not TF_ERROR.match(line)]


@pytest.mark.slow  # trains and exports in subprocesses
def test_train_and_export_print_only_our_own_lines(mnist_data_dir, tmp_path):
    run_dir, base = str(tmp_path / "run"), str(tmp_path / "models" / "digitgan")
    code, lines = _run(["train", "--set", "max_steps=2", "--set", "batch_size=8", "--set", "evaluate_every_epoch=false",
                        "--set", "architecture=compact", "--set", "steps_per_call=1", "--data-dir", mnist_data_dir,
                        "--run-dir", run_dir])
    assert code == 0, lines
    assert _own(lines)[0].startswith("Strategy: "), lines
    if platform.machine().lower() in cpu_kernels.X86_64:  # cli.py turns oneDNN on by itself there
        assert f"CPU kernels: {cpu_kernels.ONEDNN}" in lines, lines
    assert _chatter("\n".join(lines)) == [], lines
    code, lines = _run(["export", "--run-dir", run_dir, "--model-base-path", base])
    assert code == 0, lines
    assert _own(lines)[0].startswith("Exported step 2 as version 1"), lines
    assert _chatter("\n".join(lines)) == [], lines


@pytest.mark.slow  # a `cli.py export` subprocess
def test_errors_still_reach_the_terminal_in_order(tmp_path):
    code, lines = _run(["export", "--run-dir", str(tmp_path / "missing")])
    assert code == 2
    own = _own(lines)
    assert len(own) == 1 and own[0].startswith("error: no checkpoint in run dir"), lines
    assert lines[-1] == own[0] and _chatter("\n".join(lines)) == [], lines


@pytest.mark.slow  # two Python subprocesses that import TensorFlow
def test_verbose_brings_tensorflows_logs_back():
    """Both runs import TensorFlow and make it log PROBE's WARNING; only the verbose run shows it.

    oneDNN's `port.cc` line is checked only where TensorFlow turned oneDNN on (it does on CPUs with
    AVX-512-class features, or with TF_ENABLE_ONEDNN_OPTS=1); the subprocess itself reports that.
    """
    script = ("from common import cpu_kernels, quiet; quiet.install(); import tensorflow as tf; "
              f"print('onednn', cpu_kernels.in_use() == cpu_kernels.ONEDNN); {PROBE}")
    quiet_run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_user_environment(),
                               capture_output=True, text=True, timeout=300)
    verbose_run = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                                 env=_user_environment(**{quiet.VERBOSE_VARIABLE: "1"}),
                                 capture_output=True, text=True, timeout=300)
    assert quiet_run.returncode == verbose_run.returncode == 0, (quiet_run.stderr, verbose_run.stderr)
    assert _chatter(quiet_run.stderr) == [], quiet_run.stderr
    assert PROBE_LINE.search(verbose_run.stderr), verbose_run.stderr
    if "onednn True" in verbose_run.stdout:
        assert re.search(r"^I\d{4} .*port\.cc:\d+\] oneDNN custom operations are on", verbose_run.stderr,
                         re.MULTILINE), verbose_run.stderr
    else:
        assert "onednn False" in verbose_run.stdout, verbose_run.stdout


def test_global_verbose_option_is_documented():
    result = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert "--verbose" in result.output and quiet.VERBOSE_VARIABLE in result.output


def test_filter_keeps_everything_but_chatter():
    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    chunks = [b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
              b"I0000 00:00:1796102863.404468    3791 port.cc:153] oneDNN custom operations are on.\n",
              b"\rtraining:   0%| 0/2",
              b"E0000 00:00:1796102951.950587    4785 meta_optimizer.cc:967] remapper failed: INVALID_ARGUMENT: "
              b"Mutation::Apply error: fanout\n",
              b"\rtraining: 100%| 2/2\n",
              b"E0000 00:00:1796102946.576607    4785 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n",
              b"E0000 00:00:1796102946.576607    4785 some_op.cc:52] a real error\n",
              b"Traceback (most recent call last):\n",
              b"error: the end"]
    for chunk in chunks:
        os.write(write_end, chunk)
    os.close(write_end)
    quiet._copy_filtered(read_end, out_write, min_severity=2)
    os.close(out_write)
    copied = os.read(out_read, 65536)
    assert copied == (b"\rtraining:   0%| 0/2\rtraining: 100%| 2/2\n"
                      b"E0000 00:00:1796102946.576607    4785 some_op.cc:52] a real error\n"
                      b"Traceback (most recent call last):\nerror: the end")
