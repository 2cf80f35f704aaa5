"""CORS as TF Serving's http_server.cc (preflights, `--rest_api_enable_cors_support` headers) and
the playground page's files, over real HTTP on loopback."""

from __future__ import annotations

import http.client
import json
import re

import pytest

from serving import server as server_lib
from serving.config import FREE_PORT, ServeConfig
from serving_test_models import running_server

PREDICT = "/v1/models/digitgan:predict"
CORS = {"access-control-allow-origin": "*", "access-control-allow-methods": "POST, GET",
        "access-control-allow-headers": "Content-Type"}
PREFLIGHT = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type"}
SAMPLE = json.dumps({"signature_name": "sample", "inputs": {"digit": [7], "seed": [1]}})


@pytest.fixture(scope="module")
def cors_server(model_root):
    with running_server(model_base_path=str(model_root / "digitgan"), port=0, rest_port=FREE_PORT, poll_seconds=0,
                        grace_seconds=1.0, rest_api_enable_cors_support=True) as model_server:
        yield model_server


def http_request(model_server, method: str, path: str, body: str | None = None, headers: dict | None = None):
    """(status, lower-case headers, body) of one request on its own connection."""
    connection = http.client.HTTPConnection("127.0.0.1", model_server.rest_port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, {name.lower(): value for name, value in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def cors_headers(headers: dict) -> dict:
    return {name: value for name, value in headers.items() if name.startswith("access-control-")}


def preflight_count(model_server, status: str) -> int:
    found = re.search(rf':tensorflow:serving:request_count{{model_name="",status="{status}"}} (\d+)',
                      model_server.metrics.render())
    return int(found.group(1)) if found else 0


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


@pytest.mark.parametrize("fixture", ["server", "cors_server"])
def test_a_preflight_is_answered_with_or_without_cors_support(request_fixture, fixture):
    """http_server.cc answers OPTIONS under /v1/ itself, whatever the flag: 200 and no body when
    Origin holds http:// or https://, FAILED_PRECONDITION otherwise; the flag only adds headers."""
    model_server = request_fixture(fixture)
    before = preflight_count(model_server, "OK"), preflight_count(model_server, "FAILED_PRECONDITION")
    status, headers, body = http_request(model_server, "OPTIONS", PREDICT, headers=PREFLIGHT)
    assert (status, body, headers["content-length"]) == (200, b"", "0")
    assert headers["content-type"] == "text/html; charset=ISO-8859-1"  # libevent's default, as TF's reply
    assert cors_headers(headers) == (CORS if fixture == "cors_server" else {})
    for origin in (None, "null", "file://"):
        status, headers, body = http_request(model_server, "OPTIONS", "/v1/models/anything",
                                        headers={} if origin is None else {"Origin": origin})
        assert (status, json.loads(body)) == (400, {"error": "Origin header is missing in CORS preflight"})
        assert cors_headers(headers) == (CORS if fixture == "cors_server" else {})
    # Counted as TF counts them: model "", the preflight's own code.
    assert preflight_count(model_server, "OK") == before[0] + 1
    assert preflight_count(model_server, "FAILED_PRECONDITION") == before[1] + 3
    # Outside /v1/ nothing answers OPTIONS (TF: libevent's 404).
    assert http_request(model_server, "OPTIONS", "/", headers=PREFLIGHT)[0] == 404


def test_cors_support_puts_the_headers_on_every_reply_under_v1(cors_server):
    json_headers = {"Content-Type": "application/json"}
    replies = [http_request(cors_server, "POST", PREDICT, SAMPLE, json_headers),
               http_request(cors_server, "POST", "/v1/models/nope:predict", SAMPLE, json_headers),  # 404
               http_request(cors_server, "POST", PREDICT, "{", json_headers),  # 400
               http_request(cors_server, "GET", "/v1/models/digitgan"),
               http_request(cors_server, "GET", "/v1/models/digitgan/metadata"),
               http_request(cors_server, "PUT", PREDICT, SAMPLE, json_headers)]  # malformed request
    assert [status for status, _, _ in replies] == [200, 404, 400, 200, 200, 400]
    for _, headers, _ in replies:
        assert cors_headers(headers) == CORS
    # The page is ours, outside /v1/: no CORS headers (TF adds them only on the REST API's replies).
    status, headers, _ = http_request(cors_server, "GET", "/")
    assert status == 200 and cors_headers(headers) == {}


def test_no_cors_headers_without_the_flag(server):
    status, headers, _ = http_request(server, "POST", PREDICT, SAMPLE, {"Content-Type": "application/json"})
    assert status == 200 and cors_headers(headers) == {}


def test_the_playground_page_and_its_files(server):
    status, headers, body = http_request(server, "GET", "/")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    page = body.decode()
    assert "<title>digitgan playground</title>" in page
    assert http_request(server, "GET", "/playground/")[2] == body
    for path, content_type in (("/playground/playground.js", "text/javascript; charset=utf-8"),
                               ("/playground/playground.css", "text/css; charset=utf-8")):
        assert f'="{path}"' in page
        status, headers, body = http_request(server, "GET", path)
        assert (status, headers["content-type"]) == (200, content_type) and body
    # No CDN, no other host: every URL the page loads is its own.
    assert not re.search(r"https?://", page)
    script = http_request(server, "GET", "/playground/playground.js")[2].decode()
    assert "signature_name: \"sample\"" in script and ":predict" in script
    # Anything else outside /v1/ is still a 404, and the page is GET only.
    assert http_request(server, "GET", "/playground/secret.txt")[0] == 404
    assert http_request(server, "GET", "/playground/../pyproject.toml")[0] == 404
    assert http_request(server, "POST", "/", "{}")[0] == 404


def test_tfserving_engine_passes_the_cors_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    config = ServeConfig(engine="tfserving", rest_api_enable_cors_support=True)
    assert server_lib.tfserving_command(config)[-1] == "--rest_api_enable_cors_support=true"
    assert "--rest_api_enable_cors_support=true" not in server_lib.tfserving_command(ServeConfig(engine="tfserving"))
