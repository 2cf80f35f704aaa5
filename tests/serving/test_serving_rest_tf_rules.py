"""The REST layer's TF Serving rules, over real HTTP on loopback against real SavedModels:
string outputs (`_bytes` -> base64, others raw), float text (WriteDecimal), lenient base64
inputs, gzip and chunked bodies, and the Prometheus metrics (what is counted, under which
code, how the page is written, and when and where it is served).
"""

import base64
import ctypes
import gzip
import http.client
import json
import re
import socket

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import metrics as metrics_lib
from serving import json_tensor, rest_api
from serving.config import FREE_PORT, ServeConfig
from serving.server import create_server
import serving_test_models as model_builders

METRICS_PATH = "/custom/metrics"
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest_rules")
    model_builders.build_strings(str(root / "strings" / "1"))
    monitoring = root / "monitoring.config"
    monitoring.write_text(f'prometheus_config {{ enable: true, path: "{METRICS_PATH}" }}\n')
    config = ServeConfig(model_base_path=str(root / "strings"), model_name="strings", port=0, rest_port=FREE_PORT,
                         max_message_bytes=MAX_BODY, grace_seconds=1.0, monitoring_config_file=str(monitoring))
    model_server = create_server(config)
    model_server.start()
    assert model_server.wait_until_ready(60)
    yield model_server
    model_server.stop(1.0)


def post(connection, path, body: bytes, headers=None):
    """(status, headers, raw body bytes) of one POST on an open connection."""
    connection.request("POST", path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response, response.read()


def connect(server):
    return http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)


def predict_bytes(server, document, path="/v1/models/strings:predict"):
    connection = connect(server)
    try:
        return post(connection, path, json.dumps(document).encode())
    finally:
        connection.close()


# ---------------- string outputs ----------------
def test_bytes_alias_is_base64_and_other_strings_are_raw(server):
    value = b"\xff\xfe not UTF-8 \x00 \"q\" \\ \n"
    status, response, body = predict_bytes(
        server, {"inputs": [{"b64": base64.b64encode(value).decode()}, "héllo"]})
    assert status == 200 and response.headers["Content-Type"] == "application/json"
    # `text_bytes` ends in _bytes: base64 objects (IsNamedTensorBytes).
    document = json.loads(body.decode("utf-8", "surrogateescape"))
    assert document["outputs"]["text_bytes"] == [{"b64": base64.b64encode(value).decode()},
                                                 {"b64": base64.b64encode("héllo".encode()).decode()}]
    # `text` does not: raw JSON strings, the bytes as rapidjson writes them (escapes only for '"',
    # '\\' and control bytes, uppercase \u00XX), invalid UTF-8 included, UTF-8 not \u-escaped.
    assert b'"\xff\xfe not UTF-8 \\u0000 \\"q\\" \\\\ \\n"' in body
    assert '"héllo"'.encode() in body
    assert [item.encode("utf-8", "surrogateescape") for item in document["outputs"]["text"]] == \
        [value, "héllo".encode()]


def test_raw_string_output_in_row_format(server):
    status, _, body = predict_bytes(server, {"instances": ["plain"]})
    assert status == 200
    assert json.loads(body) == {"predictions": [{"text": "plain", "text_bytes": {"b64": "cGxhaW4="}}]}


# ---------------- float text ----------------
def test_float_text_is_tf_write_decimal(server):
    one_ulp_above_one = float(np.nextafter(np.float32(1), np.float32(2)))
    # NaN and -Infinity as tokens, as TF Serving's parser accepts them: the body is written by hand.
    text = ('{"signature_name": "floats", "inputs": [0.2, %r, 3, 9000000, 0.00003, 123456792, NaN, -Infinity, -0.0]}'
            % one_ulp_above_one)
    connection = connect(server)
    try:
        status, _, body = post(connection, "/v1/models/strings:predict", text.encode())
    finally:
        connection.close()
    assert status == 200, body
    compact = re.sub(rb"\s", b"", body)
    # float32: six digits when they read back, else nine; ".0" on whole numbers; NaN/Infinity.
    assert b'"y":[0.2,1.00000012,3.0,9e+06,3e-05,123456792.0,NaN,-Infinity,-0.0]' in compact
    # float64 (the cast of the same float32 values): six digits, else seventeen.
    assert b'"y64":[0.200000002980232' in compact and b"1.0000001192092896" in compact
    assert b",3.0,9e+06," in compact.split(b'"y64"')[1]


LIBC = ctypes.CDLL(None)
LIBC.strtof.restype, LIBC.strtof.argtypes = ctypes.c_float, (ctypes.c_char_p, ctypes.c_void_p)


def reference_write_decimal(value: np.float32) -> str:
    """json_tensor.cc's WriteDecimal for one float32, spelled out one value at a time, with
    the C library's own printf ("%g" is absl::StrCat's six digits) and strtof."""
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = "%g" % float(value)
    if np.float32(LIBC.strtof(text.encode(), None)) != value:
        text = "%.9g" % float(value)
    return text if ("." in text or "e" in text) else text + ".0"


def test_vectorised_float_text_matches_the_rule_on_random_bit_patterns():
    bits = np.random.default_rng(7).integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([bits.view(np.float32), np.float32([0.1, 0.5, 1e-45, 3.4028235e38, 16777217])])
    texts = json_tensor.float_texts(values)
    assert texts == [reference_write_decimal(value) for value in values]
    finite = np.isfinite(values)
    assert (np.float32([float(t) for t, ok in zip(texts, finite) if ok]) == values[finite]).all()


# ---------------- base64 inputs ----------------
@pytest.mark.parametrize("text,expected", [
    ("aGVsbG8=", b"hello"),
    ("aGVsbG8", b"hello"),                       # padding left out
    ("aGVs\nbG8=\n", b"hello"),                  # the base64 command's line breaks
    (" aGVs bG8 = ", b"hello"),                  # whitespace anywhere, between pads too
    ("aGVsbG8.", b"hello"),                      # '.' pads like '='
    ("", b""),
    ("aGVsbG8==", None),                         # padding must complete the group exactly
    ("aGVsbA=", None),
    ("aGVsbG8=aGVs", None),                      # nothing but padding after padding
    ("aGVsb", None),                             # one lone digit in the last group
    ("aGV-bG8_", None),                          # web-safe alphabet is not accepted
    ("aGVs*G8=", None),
])
def test_base64_unescape_follows_absl(text, expected):
    assert json_tensor.base64_unescape(text) == expected


def test_lenient_base64_input_over_rest(server):
    wrapped = base64.encodebytes(b"x" * 100).decode()  # 76-column lines, as `base64` writes them
    status, _, body = predict_bytes(server, {"inputs": [{"b64": wrapped}, {"b64": "aGVsbG8"}]})
    assert status == 200, body
    assert json.loads(body)["outputs"]["text"] == ["x" * 100, "hello"]
    status, _, body = predict_bytes(server, {"inputs": [{"b64": "aGVsbG8=="}]})
    assert status == 400 and "Unable to base64 decode" in json.loads(body)["error"]


# ---------------- request bodies ----------------
def test_gzip_body_is_decompressed_and_a_bomb_refused(server):
    document = json.dumps({"inputs": ["zipped"]}).encode()
    connection = connect(server)
    try:
        status, _, body = post(connection, "/v1/models/strings:predict", gzip.compress(document),
                               {"Content-Encoding": "gzip"})
        assert status == 200 and json.loads(body)["outputs"]["text"] == ["zipped"]
        bomb = gzip.compress(b'{"inputs": ["' + b"a" * (4 * MAX_BODY) + b'"]}')
        assert len(bomb) < MAX_BODY
        status, _, body = post(connection, "/v1/models/strings:predict", bomb, {"Content-Encoding": "gzip"})
        assert status == 413 and "Decompressed request body exceeds the limit" in json.loads(body)["error"]
        status, _, body = post(connection, "/v1/models/strings:predict", b"\x1f\x8b not gzip",
                               {"Content-Encoding": "gzip"})
        assert status == 400 and "Failed to decompress" in json.loads(body)["error"]
        # The same connection still serves the next request.
        status, _, body = post(connection, "/v1/models/strings:predict", document)
        assert status == 200 and json.loads(body)["outputs"]["text"] == ["zipped"]
    finally:
        connection.close()


def test_chunked_body_is_read_and_the_connection_reused(server):
    connection = connect(server)
    try:
        pieces = [b'{"inputs": ', b'["chun', b'ked"]}']
        connection.request("POST", "/v1/models/strings:predict", body=iter(pieces), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["outputs"]["text"] == ["chunked"]
        status, _, body = post(connection, "/v1/models/strings:predict", b'{"inputs": ["next"]}')
        assert status == 200 and json.loads(body)["outputs"]["text"] == ["next"]
    finally:
        connection.close()


def raw_exchange(server, request: bytes) -> bytes:
    """Everything the server sends back on one connection until it closes it."""
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_chunked_body_over_the_limit_closes_the_connection(server):
    chunk = b"a" * (MAX_BODY // 2 + 1)
    smuggled = b"GET /v1/models/strings HTTP/1.1\r\nHost: x\r\n\r\n"  # must never be answered
    request = (b"POST /v1/models/strings:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(2))
               + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n")
    received = raw_exchange(server, request)
    assert received.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in received
    assert received.count(b"HTTP/1.1") == 1  # the leftover chunks were not parsed as a request


def test_malformed_chunks_and_unknown_transfer_coding_close_the_connection(server):
    received = raw_exchange(server, b"POST /v1/models/strings:predict HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 ") and b"Malformed chunked request body" in received
    received = raw_exchange(server, b"POST /v1/models/strings:predict HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: gzip\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 501 ") and received.count(b"HTTP/1.1") == 1


# ---------------- metrics ----------------
def metrics_page(server) -> str:
    connection = connect(server)
    try:
        connection.request("GET", METRICS_PATH)
        response = connection.getresponse()
        assert response.status == 200 and response.headers["Content-Type"] == "text/plain"
        return response.read().decode()
    finally:
        connection.close()


def count(page: str, model: str, status: str) -> int:
    found = re.search(rf':tensorflow:serving:request_count{{model_name="{model}",status="{status}"}} (\d+)', page)
    return int(found.group(1)) if found else 0


def get(server, path):
    connection = connect(server)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_every_v1_request_is_counted(server):
    before = metrics_page(server)
    assert get(server, "/v1/models/strings")[0] == 200
    assert get(server, "/v1/models/strings/metadata")[0] == 200
    assert get(server, "/v1/models/strings/versions/7")[0] == 404
    assert get(server, "/v1/what/ever")[0] == 400
    assert predict_bytes(server, {"instances": "not a list"})[0] == 400
    after = metrics_page(server)
    assert count(after, "strings", "OK") == count(before, "strings", "OK") + 2
    assert count(after, "strings", "NOT_FOUND") == count(before, "strings", "NOT_FOUND") + 1
    assert count(after, "strings", "INVALID_ARGUMENT") == count(before, "strings", "INVALID_ARGUMENT") + 1
    assert count(after, "", "INVALID_ARGUMENT") == count(before, "", "INVALID_ARGUMENT") + 1
    # Status and metadata GETs are timed with an empty API label: TF's parser sets none for them.
    assert ':tensorflow:serving:request_latency_count{model_name="strings",API="",entrypoint="REST"}' in after


def test_a_failed_request_has_the_same_status_label_over_grpc_and_rest(server):
    before = metrics_page(server)
    status, _, body = predict_bytes(server, {"signature_name": "uninitialized", "inputs": [1.0]})
    assert status == 400, body  # FAILED_PRECONDITION is HTTP 400, like INVALID_ARGUMENT
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "strings", "uninitialized"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.float32([1.0])))
        with pytest.raises(grpc.RpcError) as failure:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 30)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = metrics_page(server)
    assert count(after, "strings", "FAILED_PRECONDITION") == count(before, "strings", "FAILED_PRECONDITION") + 2
    assert count(after, "strings", "INVALID_ARGUMENT") == count(before, "strings", "INVALID_ARGUMENT")


def test_metrics_page_format_and_path(server):
    assert predict_bytes(server, {"inputs": ["a"]})[0] == 200
    page = metrics_page(server)
    labels = 'model_name="strings",API="predict",entrypoint="REST"'
    bounds = re.findall(rf':tensorflow:serving:request_latency_bucket{{{labels},le="([^"]+)"}}', page)
    assert bounds[:4] == ["10", "18", "32.4", "58.32"] and bounds[-1] == "+Inf" and len(bounds) == 34
    assert all(not bound.endswith(".0") for bound in bounds)
    total = re.search(rf':tensorflow:serving:request_latency_sum{{{labels}}} (\S+)', page).group(1)
    assert total == "%g" % float(total)  # six significant digits, as absl::StrCat(double)
    # Only at the configured path; TF Serving's default path is not served here.
    assert get(server, "/monitoring/prometheus/metrics")[0] == 404


def test_histogram_buckets_count_as_tf_histogram():
    metrics = metrics_lib.Metrics()
    for micros in (10, 9.9, 18.5):  # 10 is not below the first bound: it falls in the second bucket
        metrics.record("m", "OK", "predict", "REST", micros)
    page = metrics.render()
    assert 'le="10"} 1\n' in page and 'le="18"} 2\n' in page and 'le="32.4"} 3\n' in page
    assert ':tensorflow:serving:request_latency_sum{model_name="m",API="predict",entrypoint="REST"} 37\n' in page


def test_no_metrics_page_without_a_monitoring_config(server):
    api = rest_api.RestApi(server.manager, server.metrics, 1000, prometheus_path=None)
    status, _, _ = api.handle("GET", "/monitoring/prometheus/metrics", None)
    assert status == 404


@pytest.mark.parametrize("text,path", [
    ('prometheus_config { enable: true path: "/p" }', "/p"),
    ("prometheus_config { enable: true }", metrics_lib.DEFAULT_PROMETHEUS_PATH),
    ('prometheus_config { enable: false path: "/p" }', None),
    ("", None),
])
def test_monitoring_config_file(tmp_path, text, path):
    config = tmp_path / "monitoring.config"
    config.write_text(text)
    assert metrics_lib.prometheus_path(str(config)) == path
    assert metrics_lib.prometheus_path(None) is None


@pytest.mark.parametrize("text,mention", [
    ("prometheus_config { enable: yes_please }", "is not a text-format MonitoringConfig"),
    ("unknown_field: 1", "is not a text-format MonitoringConfig"),
    ('prometheus_config { enable: true path: "metrics" }', "must start with '/'"),
])
def test_bad_monitoring_config_file(tmp_path, text, mention):
    config = tmp_path / "monitoring.config"
    config.write_text(text)
    with pytest.raises(ValueError, match=re.escape(mention)):
        metrics_lib.prometheus_path(str(config))
    with pytest.raises(ValueError, match="cannot read monitoring config file"):
        metrics_lib.prometheus_path(str(tmp_path / "missing.config"))


def test_deploy_monitoring_config_turns_metrics_on_at_the_default_path():
    deploy_config = model_builders.__file__.rsplit("/tests/", 1)[0] + "/serving/deploy/monitoring.config"
    assert metrics_lib.prometheus_path(deploy_config) == "/monitoring/prometheus/metrics"


def test_serve_with_an_unreadable_monitoring_config_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, ["serve", "--port", "0", "--rest-port", "0", "--monitoring-config-file",
                                          str(tmp_path / "missing.config")])
    assert result.exit_code == 2, result.output
    assert "error: cannot read monitoring config file" in result.output and "Traceback" not in result.output
