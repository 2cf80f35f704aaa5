"""A second server on a port one already listens on is refused at start, gRPC and REST alike:
never two servers splitting one port's clients (gRPC's core would share it by SO_REUSEPORT)."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from serving import ports
from serving.config import FREE_PORT, ServeConfig
from serving.server import create_server
from serving_test_models import running_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def first(model_root):
    """A running server on free gRPC and REST ports."""
    with running_server(model_base_path=str(model_root / "digitgan"), port=0, rest_port=FREE_PORT,
                        poll_seconds=0) as model_server:
        yield model_server


def second_config(model_root, **ports_given) -> ServeConfig:
    return ServeConfig(model_base_path=str(model_root / "digitgan"), poll_seconds=0, grace_seconds=0.5,
                       **{"port": 0, "rest_port": 0, **ports_given})


def still_serves(model_server) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{model_server.grpc_port}") as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "digitgan"
        reply = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, 10)
    return reply.model_version_status[0].version == 1


def test_a_taken_grpc_port_is_refused(first, model_root):
    port = first.grpc_port
    with pytest.raises(ValueError, match=rf"^gRPC port {port} on 127.0.0.1 is already in use .* --port$"):
        create_server(second_config(model_root, port=port))
    # Our listening socket has no SO_REUSEPORT either, so a server that asks for sharing (gRPC's
    # default, as tensorflow_model_server's) cannot join it.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError) as refused:
            other.bind(("127.0.0.1", port))
    assert refused.value.errno == errno.EADDRINUSE
    assert still_serves(first)


def test_grpc_itself_refuses_the_port_without_our_probe(first, model_root, monkeypatch):
    """The probe only words the refusal: with it gone, gRPC's bind (grpc.so_reuseport 0) still refuses."""
    monkeypatch.setattr(ports, "check_free", lambda *args: None)
    port = first.grpc_port
    with pytest.raises(ValueError, match=rf"^cannot listen on 127.0.0.1:{port} for gRPC"):
        create_server(second_config(model_root, port=port))
    assert still_serves(first)


def test_a_taken_rest_port_is_refused(first, model_root):
    port = first.rest_port
    with pytest.raises(ValueError, match=rf"^REST port {port} on 127.0.0.1 is already in use .* --rest-port$"):
        create_server(second_config(model_root, rest_port=port))
    assert still_serves(first)


def test_a_server_refused_for_its_grpc_port_gives_its_rest_port_back(first, model_root):
    with socket.socket() as spare:  # a free port for the second server's REST
        spare.bind(("127.0.0.1", 0))
        rest_port = spare.getsockname()[1]
    with pytest.raises(ValueError, match=f"gRPC port {first.grpc_port} "):
        create_server(second_config(model_root, port=first.grpc_port, rest_port=rest_port))
    ports.check_free("REST", "127.0.0.1", rest_port, "--rest-port")  # free again


@pytest.mark.slow  # two `cli.py serve` processes (TensorFlow start-up each)
@pytest.mark.parametrize("taken", ["gRPC", "REST"])
def test_cli_serve_on_a_taken_port_prints_one_error_line_and_exits_2(first, taken):
    port = first.grpc_port if taken == "gRPC" else first.rest_port
    flags = ["--port", str(port), "--rest-port", "0"] if taken == "gRPC" else ["--port", "0", "--rest-port", str(port)]
    finished = subprocess.run([sys.executable, "cli.py", "serve", "--pretrained", *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2, finished
    flag = "--port" if taken == "gRPC" else "--rest-port"
    assert finished.stderr.splitlines() == [
        f"error: {taken} port {port} on 127.0.0.1 is already in use (is another server running?); "
        f"stop it or choose another port with {flag}"], finished.stderr
    assert finished.stdout == ""
    assert still_serves(first)
