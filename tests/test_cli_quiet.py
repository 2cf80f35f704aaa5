"""The CLI's output is our own: TensorFlow's start-up chatter is filtered, --verbose brings it back."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from common import quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATTER = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|cuda", re.IGNORECASE)


def _user_environment(**extra: str) -> dict:
    """The environment of a user's shell: none of the test session's log settings."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_CPP_MIN_LOG_LEVEL", quiet.VERBOSE_VARIABLE)}
    environment.update(extra)
    return environment


def _run(arguments: list[str], **extra: str) -> tuple[int, list[str]]:
    """Runs `python cli.py ...` like a user; returns its exit code and its stdout+stderr lines."""
    result = subprocess.run([sys.executable, "cli.py", *arguments], cwd=REPO, env=_user_environment(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return result.returncode, [line for line in re.split(r"[\r\n]", result.stdout) if line.strip()]


def test_train_and_export_print_only_our_own_lines(mnist_data_dir, tmp_path):
    run_dir, base = str(tmp_path / "run"), str(tmp_path / "models" / "digitgan")
    code, lines = _run(["train", "--set", "max_steps=2", "--set", "batch_size=8", "--set", "evaluate_every_epoch=false",
                        "--set", "architecture=compact", "--set", "steps_per_call=1", "--data-dir", mnist_data_dir,
                        "--run-dir", run_dir])
    assert code == 0, lines
    assert lines[0].startswith("Strategy: "), lines
    assert not [line for line in lines if CHATTER.search(line)], lines
    code, lines = _run(["export", "--run-dir", run_dir, "--model-base-path", base])
    assert code == 0, lines
    assert lines[0].startswith("Exported step 2 as version 1"), lines
    assert not [line for line in lines if CHATTER.search(line)], lines


def test_errors_still_reach_the_terminal_in_order(tmp_path):
    code, lines = _run(["export", "--run-dir", str(tmp_path / "missing")])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint in run dir"), lines


def test_verbose_brings_tensorflows_logs_back():
    script = "from common import quiet; quiet.install(); import tensorflow"
    quiet_run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_user_environment(),
                               capture_output=True, text=True, timeout=300)
    verbose_run = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                                 env=_user_environment(**{quiet.VERBOSE_VARIABLE: "1"}),
                                 capture_output=True, text=True, timeout=300)
    assert quiet_run.returncode == verbose_run.returncode == 0
    assert quiet_run.stderr == "", quiet_run.stderr
    assert re.search(r"^I\d{4} .*port\.cc", verbose_run.stderr, re.MULTILINE), verbose_run.stderr


def test_global_verbose_option_is_documented():
    result = subprocess.run([sys.executable, "cli.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            env=_user_environment(COLUMNS="200", NO_COLOR="1"), timeout=120)
    assert "--verbose" in result.stdout and quiet.VERBOSE_VARIABLE in result.stdout


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
