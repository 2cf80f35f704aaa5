"""The model server in a child process, for tests and benchmarks.

`ServerProcess.start(...)` runs `run_server(ServeConfig(...))` (what `python cli.py serve` runs)
in a fresh Python, so its clients do not share a GIL with it, and reads what it prints: the
ports ("gRPC listening on HOST:PORT", "REST listening on HOST:PORT") and its models ("model
NAME: versions [...]"). Every wait has a deadline, and a server that exits or misses the
deadline raises `ServerProcessError` with the last lines it wrote on stdout and stderr.
`ServerProcess(command)` does the same for any command line (e.g. `cli.py serve ...`).
No TensorFlow here: the child imports it, not the caller.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 180.0  # a start on a busy 2-core machine: interpreter, TensorFlow, first model load
STOP_SECONDS = 60.0
OUTPUT_LINES_KEPT = 200
SERVE_SCRIPT = ("import json, sys\n"
                "from serving.config import ServeConfig\n"
                "from serving.server import run_server\n"
                "sys.exit(run_server(ServeConfig(**json.loads(sys.argv[1]))))\n")


class ServerProcessError(RuntimeError):
    """The server process exited early or did not print what was awaited in time."""


class ServerProcess:
    """A server child process and the lines it has printed so far."""

    def __init__(self, command: list[str], cwd: str | Path = ROOT):
        self.command = command
        self.process = subprocess.Popen(command, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, errors="replace")
        self.lines: list[str] = []  # stdout, every line, stripped
        self._stderr: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._changed = threading.Condition()
        self._stdout_done = False
        # Reading both pipes all the time also keeps a chatty child from blocking on a full pipe.
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    @classmethod
    def start(cls, wait_for_models: bool = True, timeout: float = START_SECONDS, **settings) -> ServerProcess:
        """`run_server(ServeConfig(**settings))` in a child; returns once its gRPC port is printed
        and, with wait_for_models, once it has printed its models' versions (all loaded)."""
        server = cls([sys.executable, "-c", SERVE_SCRIPT, json.dumps(settings)])
        try:
            server.wait_for_line(lambda line: line.startswith("gRPC listening on "), timeout)
            if wait_for_models:
                server.wait_for_line(lambda line: re.match(r"model \S+: versions ", line) is not None, timeout)
        except BaseException:
            server.stop()
            raise
        return server

    # ---- output ----
    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.strip())
                self._changed.notify_all()
        with self._changed:
            self._stdout_done = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line.rstrip("\n"))

    def wait_for_line(self, predicate, timeout: float = START_SECONDS, after: int = 0) -> str:
        """The first stdout line from index `after` on that satisfies predicate(line), waiting
        for it at most `timeout` seconds; ServerProcessError (with the output) otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            index = after
            while True:
                while index < len(self.lines):
                    if predicate(self.lines[index]):
                        return self.lines[index]
                    index += 1
                if self._stdout_done:
                    raise self._error(f"closed its output (exit code {self.process.poll()}) before printing "
                                      f"the line awaited")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._error(f"did not print the line awaited within {timeout:g} s")
                self._changed.wait(remaining)

    def _error(self, what: str) -> ServerProcessError:
        stdout = "\n".join(self.lines[-OUTPUT_LINES_KEPT:]) or "(nothing)"
        stderr = "\n".join(self._stderr) or "(nothing)"
        return ServerProcessError(f"server process {what}: {' '.join(self.command)}\n"
                                  f"--- stdout ---\n{stdout}\n--- stderr (last {OUTPUT_LINES_KEPT} lines) ---\n{stderr}")

    # ---- what it printed ----
    def _port(self, prefix: str) -> int | None:
        with self._changed:
            line = next((line for line in self.lines if line.startswith(prefix)), None)
        return None if line is None else int(re.search(r":(\d+)$", line).group(1))

    @property
    def grpc_port(self) -> int | None:
        return self._port("gRPC listening on ")

    @property
    def rest_port(self) -> int | None:
        return self._port("REST listening on ")

    @property
    def address(self) -> str:
        """The gRPC address on loopback."""
        return f"127.0.0.1:{self.grpc_port}"

    # ---- stopping ----
    def send_signal(self, signal_number: int) -> None:
        self.process.send_signal(signal_number)

    def wait(self, timeout: float = STOP_SECONDS) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL if it is still running, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = STOP_SECONDS) -> int:
        """SIGTERM (a graceful stop), then SIGKILL if it has not exited within timeout; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
