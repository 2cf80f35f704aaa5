"""`generate` right after `serve ... &`: the client waits for a server that is still starting, and
gives up with a clear ClientError when the model never becomes available."""
from __future__ import annotations

import socket
import threading

import pytest

from client import grpc_client
from serving.config import ServeConfig
from serving.server import create_server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_client_waits_for_a_server_that_starts_after_it_asked(model_root):
    port = _free_port()
    outcome = {}
    asked = threading.Event()

    def ask():
        asked.set()
        try:
            grpc_client.wait_until_available(f"127.0.0.1:{port}", "digitgan", timeout=120)
            outcome["images"] = grpc_client.generate(f"127.0.0.1:{port}", "digitgan", digits=[7], count=2)[0]
        except grpc_client.ClientError as error:
            outcome["error"] = error

    waiter = threading.Thread(target=ask)
    waiter.start()
    assert asked.wait(10)
    server = create_server(ServeConfig(model_base_path=str(model_root / "digitgan"), port=port, rest_port=0,
                                       poll_seconds=0.2, grace_seconds=1.0))
    server.start()
    try:
        waiter.join(150)
        assert not waiter.is_alive()
        assert "error" not in outcome, outcome
        assert outcome["images"].shape == (2, 28, 28, 1)
    finally:
        server.stop(1.0)


def test_a_model_the_server_does_not_know_is_reported_not_waited_for(server):
    with pytest.raises(grpc_client.ClientError, match=r"model 'no_such_model' not found on .*: Could not find any versions"):
        grpc_client.wait_until_available(f"127.0.0.1:{server.grpc_port}", "no_such_model", timeout=60)


def test_nothing_listening_ends_the_wait_with_a_clear_error():
    with pytest.raises(grpc_client.ClientError, match=r"cannot reach digitgan server at .* within 1 s"):
        grpc_client.wait_until_available(f"127.0.0.1:{_free_port()}", "digitgan", timeout=1)


def test_a_dead_server_in_a_list_does_not_use_up_the_wait(server, monkeypatch):
    """wait_until_available asks the servers in list order, each for at most ASK_SECONDS: a dead one
    listed first costs that much of the 20 s wait, and the live one after it answers."""
    dead, live = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{server.grpc_port}"
    asked = []  # (address, timeout, answered) of every status request
    get_status = grpc_client.get_status

    def recording_get_status(address, *arguments, timeout, **keywords):
        try:
            versions = get_status(address, *arguments, timeout=timeout, **keywords)
        except grpc_client.ClientError:
            asked.append((address, timeout, False))
            raise
        asked.append((address, timeout, True))
        return versions

    monkeypatch.setattr(grpc_client, "get_status", recording_get_status)
    for _ in range(2):
        asked.clear()
        assert grpc_client.wait_until_available(f"{dead},{live}", "digitgan", timeout=20) is None  # no ClientError
        assert [(address, answered) for address, _, answered in asked] == [(dead, False), (live, True)], asked
        assert asked[0][1] <= grpc_client.ASK_SECONDS, asked
