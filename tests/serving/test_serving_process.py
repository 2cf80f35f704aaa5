"""run_server in a real process: prints its ports and models, stops cleanly on SIGTERM."""

import os
import re
import shutil
import signal
import subprocess
import sys

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

SCRIPT = """
import sys
from serving.config import FREE_PORT, ServeConfig
from serving.server import run_server
sys.exit(run_server(ServeConfig(model_base_path=sys.argv[1], port=0, rest_port=FREE_PORT, grace_seconds=1.0)))
"""


@pytest.mark.slow  # a server in a subprocess (TensorFlow start-up included)
def test_run_server_sigterm(model_root):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(model_root / "digitgan")], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while not any(line.startswith("model digitgan") for line in lines):
            line = process.stdout.readline()
            assert line, f"server exited early: {lines}"
            lines.append(line.strip())
        grpc_line = next(line for line in lines if line.startswith("gRPC listening on"))
        assert any(line.startswith("REST listening on 127.0.0.1:") for line in lines)
        assert "model digitgan: versions [1]" in lines
        port = int(re.search(r":(\d+)$", grpc_line).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "digitgan"
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, 10)
            assert status.model_version_status[0].version == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_serve_waits_for_a_first_version_and_says_how_to_make_one(model_root, tmp_path):
    """As tensorflow_model_server, `serve` on an empty base path waits; it also prints where it looks."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = tmp_path / "digitgan"
    process = subprocess.Popen([sys.executable, "cli.py", "serve", "--model-base-path", str(base), "--port", "0",
                                "--rest-port", "0", "--poll-seconds", "0.2"],
                               cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("waiting for one" in line for line in lines):
            line = process.stdout.readline()
            assert line, f"server exited early: {lines}"
            lines.append(line.strip())
        waiting = lines[-1]
        assert waiting.startswith(f"model digitgan: no version under {base} yet")
        assert "python cli.py export" in waiting and "python cli.py serve --pretrained" in waiting
        assert not any(line.startswith("REST listening") for line in lines)  # --rest-port 0: no REST
        shutil.copytree(model_root / "digitgan" / "1", tmp_path / "staging")
        base.mkdir(exist_ok=True)
        os.rename(tmp_path / "staging", base / "1")  # atomically, as `cli.py export` publishes
        line = process.stdout.readline().strip()
        assert line == "model digitgan: versions [1]", line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
