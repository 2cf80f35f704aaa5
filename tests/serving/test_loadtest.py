"""`python -m bench.loadtest` as a command: its model option is spelled as the CLI's."""
from __future__ import annotations

import pytest

from bench import loadtest


@pytest.mark.parametrize("flag", ["--model-name", "--model"])  # --model: the old spelling, kept for one release
def test_loadtest_sends_the_model_named_by_model_name(server, capsys, monkeypatch, flag):
    class AtLeastOneRequest(loadtest.LoadGenerator):
        """Each client sends one request even when a busy machine used up the 0.3 s before it could."""

        async def _client(self, stub, deadline):
            self.outcomes.append(await self._one_request(stub))
            await super()._client(stub, deadline)

    monkeypatch.setattr(loadtest, "LoadGenerator", AtLeastOneRequest)
    address = f"127.0.0.1:{server.grpc_port}"
    common = ["--server", address, "--clients", "1", "--seconds", "0.3"]
    assert loadtest.main([*common, flag, "digitgan"]) == 0
    output = capsys.readouterr().out
    assert "model 'digitgan'" in output and "failures: none" in output, output
    assert loadtest.main([*common, flag, "nope"]) == 1  # the name is really sent: every request is NOT_FOUND
    output = capsys.readouterr().out
    assert "model 'nope'" in output and "NOT_FOUND" in output, output
