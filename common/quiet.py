"""Keeps TensorFlow's start-up chatter out of the user's terminal (no TensorFlow import here).

TensorFlow logs through absl before anything calls `absl::InitializeLog()`, and absl then writes
every message to stderr whatever `TF_CPP_MIN_LOG_LEVEL` says, so the env var alone does not hide
`port.cc` (oneDNN), `cudart_stub.cc`, `cpu_feature_guard.cc` or absl's own notice; which of them
appear depends on the machine (docs/experiments.md, "Moved from code comments", has the details).

`install()` therefore filters file descriptor 2 itself: stderr becomes a pipe read by a small
forked process that writes every line back except TF's C++ log lines below
`TF_CPP_MIN_LOG_LEVEL` (we default it to 2: errors only), absl's pre-init notice and the two
harmless errors in HARMLESS_ERRORS. Everything else (Python tracebacks, our `error:` lines, progress
bars, other TF errors, fatal messages) goes through unchanged, even when the process aborts: the
filter sees end-of-file only once every writer is gone, and drains the pipe first. It also sets
the `tensorflow` Python logger to ERROR, which hides tf.function retracing warnings.

`--verbose` on the CLI, or `DIGITGAN_VERBOSE=1` in the environment, turns all of this off.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import select
import signal
import sys
import time

VERBOSE_VARIABLE = "DIGITGAN_VERBOSE"
DEFAULT_MIN_LOG_LEVEL = "2"  # TF_CPP_MIN_LOG_LEVEL: 0 info, 1 warnings, 2 errors, 3 fatal only
# glog/absl prefix: severity letter, MMDD (0000 before absl is initialised), time, thread id, file:line], e.g.
# "I0000 00:00:1796102863.404468    3791 port.cc:153] oneDNN custom operations are on."
TF_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\s:]+:\d+\] ")
LOG_LINE_ANYWHERE = re.compile(TF_LOG_LINE.pattern[1:] + rb"|" + re.escape(b"WARNING: All log messages before absl"))
SEVERITIES = b"IWEF"
ABSL_PRE_INIT_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# ERRORs that are noise here: the CUDA probe of a CPU-only machine, and a grappler pass that
# gives up on a graph (TensorFlow then runs the graph without that rewrite).
HARMLESS_ERRORS = (b"failed call to cuInit", b"remapper failed: INVALID_ARGUMENT: Mutation::Apply error")
HOLD_SECONDS = 0.2  # a partial line that may become a log line waits this long for its end
EXIT_WAIT_SECONDS = 5.0  # at exit, how long to wait for the filter to write what is left
LONGEST_PREFIX = 100  # a partial line longer than this without a log prefix is passed on

_installed = False


def verbose_requested() -> bool:
    """True when DIGITGAN_VERBOSE asks for TensorFlow's own logs (any value but '', '0', 'false')."""
    return os.environ.get(VERBOSE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def install(verbose: bool = False) -> None:
    """Quiet TensorFlow for the rest of this process and its children; call before importing it.

    verbose=True (or DIGITGAN_VERBOSE=1) leaves every log alone and exports DIGITGAN_VERBOSE=1
    so that child processes are verbose too. Safe to call more than once.
    """
    global _installed
    if verbose:
        os.environ[VERBOSE_VARIABLE] = "1"
    if _installed or verbose_requested():
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_MIN_LOG_LEVEL)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # TF's get_logger() keeps a level set before import
    _filter_stderr(_min_severity())


def is_chatter(line: bytes, min_severity: int) -> bool:
    """Whether one stderr line (without its newline) is TensorFlow chatter to drop."""
    if line.rstrip(b"\r") == ABSL_PRE_INIT_NOTICE:
        return True
    match = TF_LOG_LINE.match(line)
    if match is None:
        return False
    severity = SEVERITIES.index(match.group(1))
    if severity < min_severity:
        return True
    return severity == 2 and any(text in line for text in HARMLESS_ERRORS)


def _min_severity() -> int:
    try:
        return max(0, min(3, int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", DEFAULT_MIN_LOG_LEVEL))))
    except ValueError:
        return int(DEFAULT_MIN_LOG_LEVEL)


def _filter_stderr(min_severity: int) -> None:
    """Route fd 2 through a forked filter process; at exit, wait for it to write everything."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    terminal = os.dup(2)
    child = os.fork()
    if child == 0:  # the filter: no Python-level cleanup, only the copy loop
        os.close(write_end)
        # Ctrl-C goes to the whole process group: the filter must outlive the program's handling of it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _copy_filtered(read_end, terminal, min_severity)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(terminal)

    def wait_for_filter() -> None:
        # Our last lines (e.g. "error: ...") must reach the terminal before the shell's prompt. Bounded:
        # a child process that inherited fd 2 and outlives us keeps the pipe, and so the filter, open.
        try:
            sys.stderr.flush()
            os.close(2)
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + EXIT_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                if os.waitpid(child, os.WNOHANG)[0] != 0:
                    return
            except OSError:
                return
            time.sleep(0.01)

    atexit.register(wait_for_filter)


def _copy_filtered(source: int, target: int, min_severity: int) -> None:
    """Copy source to target line by line, dropping chatter, until end-of-file."""
    pending = b""  # start of a line that is not decided yet
    passing = False  # inside a line already judged not to be chatter: copy until its newline
    while True:
        timeout = HOLD_SECONDS if pending else None
        readable, _, _ = select.select([source], [], [], timeout)
        if not readable:  # a held partial line got no newline in time: it is not a log line
            _write(target, pending)
            pending, passing = b"", True
            continue
        chunk = os.read(source, 65536)
        if not chunk:
            _write(target, pending)
            return
        data = pending + chunk
        pending = b""
        out = []
        while data:
            newline = data.find(b"\n")
            line_end = len(data) if newline < 0 else newline
            # A log line can arrive in the middle of someone's unfinished line (a progress bar's
            # "\r" updates): it starts a line of its own.
            log_start = LOG_LINE_ANYWHERE.search(data, 0 if passing else 1, line_end)
            if log_start is not None:
                out.append(data[:log_start.start()])
                data, passing = data[log_start.start():], False
                continue
            if passing or (newline < 0 and not _may_become_chatter(data)):
                out.append(data[:line_end + 1])
                data, passing = data[line_end + 1:], newline < 0
                continue
            if newline < 0:
                pending = data
                break
            line, data = data[:newline + 1], data[newline + 1:]
            if not is_chatter(line[:-1], min_severity):
                out.append(line)
        _write(target, b"".join(out))


def _may_become_chatter(partial: bytes) -> bool:
    if len(partial) > LONGEST_PREFIX:
        return TF_LOG_LINE.match(partial) is not None
    return ABSL_PRE_INIT_NOTICE.startswith(partial) or partial[:1] in (b"I", b"W", b"E", b"F")


def _write(target: int, data: bytes) -> None:
    while data:
        try:
            written = os.write(target, data)
        except OSError:
            return  # the terminal is gone: nothing left to show
        data = data[written:]
