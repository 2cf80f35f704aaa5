"""run_server in a real process: prints its ports and models, stops cleanly on SIGTERM."""

import os
import shutil
import signal
import sys

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from bench.server_process import ServerProcess, ServerProcessError
from serving.config import FREE_PORT

WAIT_SECONDS = 180.0  # a start on a busy machine; only a safety net against hangs


@pytest.mark.slow  # a server in a subprocess (TensorFlow start-up included)
def test_run_server_sigterm(model_root):
    server = ServerProcess.start(model_base_path=str(model_root / "digitgan"), port=0, rest_port=FREE_PORT,
                                 grace_seconds=1.0)
    try:
        lines = list(server.lines)
        assert any(line.startswith("gRPC listening on ") for line in lines)
        assert any(line.startswith("REST listening on 127.0.0.1:") for line in lines)
        assert "model digitgan: versions [1]" in lines
        with grpc.insecure_channel(server.address) as channel:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "digitgan"
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, 10)
            assert status.model_version_status[0].version == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


@pytest.mark.slow  # `cli.py serve` in a subprocess (TensorFlow start-up included)
def test_cli_serve_waits_for_a_first_version_and_says_how_to_make_one(model_root, tmp_path):
    """As tensorflow_model_server, `serve` on an empty base path waits; it also prints where it looks."""
    base = tmp_path / "digitgan"
    server = ServerProcess([sys.executable, "cli.py", "serve", "--model-base-path", str(base), "--port", "0",
                            "--rest-port", "0", "--poll-seconds", "0.2"])
    try:
        waiting = server.wait_for_line(lambda line: "waiting for one" in line, WAIT_SECONDS)
        lines = list(server.lines)
        assert waiting.startswith(f"model digitgan: no version under {base} yet")
        assert "python cli.py export" in waiting and "python cli.py serve --pretrained" in waiting
        assert not any("listening" in line for line in lines)  # no port opens before a version is AVAILABLE
        shutil.copytree(model_root / "digitgan" / "1", tmp_path / "staging")
        base.mkdir(exist_ok=True)
        os.rename(tmp_path / "staging", base / "1")  # atomically, as `cli.py export` publishes
        after = lines.index(waiting) + 1
        assert server.wait_for_line(lambda _line: True, WAIT_SECONDS, after=after).startswith("gRPC listening on ")
        line = server.wait_for_line(lambda _line: True, WAIT_SECONDS, after=after + 1)
        assert line == "model digitgan: versions [1]", line  # --rest-port 0: no REST line between
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


@pytest.mark.slow  # a server in a subprocess (TensorFlow start-up included)
def test_a_server_that_exits_early_is_reported_with_its_output(tmp_path):
    """The helper's wait ends when the process does, with what it wrote, not at the deadline."""
    config = tmp_path / "models.config"
    config.write_text("this is not a ModelServerConfig")
    with pytest.raises(ServerProcessError) as failure:
        ServerProcess.start(model_config_file=str(config), port=0, rest_port=0)
    message = str(failure.value)
    assert "before printing the line awaited" in message
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in message
