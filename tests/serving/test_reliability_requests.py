"""Reliability of request handling: malformed requests, fuzzing, deadlines, concurrency limits.

1. Malformed requests, one table per transport, sent over real gRPC and real REST to the
   session `server` (conftest.py). Each case asserts the status TF Serving gives (its
   documented REST/gRPC behaviour), that the message names the offending thing, and
   that no Python exception text or traceback reaches the client. A correct request after
   the tables still gets the correct answer.
2. Fuzzing (hypothesis) of the request -> tensor paths: random PredictRequests, mutated
   serialized requests and random JSON bodies either succeed or fail with the project's
   ServingError (a clear status and message), never another exception. Each fuzz test runs
   DIGITGAN_FUZZ_EXAMPLES examples (default 200, a few seconds); for a long run on demand:
       DIGITGAN_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest \\
           tests/serving/test_reliability_requests.py -k fuzz -p no:warnings -q
   test_serving_units.py::test_parser_property fuzzes tensors.proto_to_ndarray alone;
   these tests reuse its TensorProto strategy and go through the whole request.
3. Deadlines and concurrency limits, with the `gate` test model (serving_test_models.py),
   whose requests block inside the graph until the test releases them: no sleeps, no
   timing assertions.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import os
import re
import socket
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import message as protobuf_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

import serving_test_models as models
from serving_test_models import Gate, wait_for
from serving import inference, json_tensor, prediction, request_runner, rest_api, tensors
from serving.config import FREE_PORT, ServeConfig
from serving.metrics import Metrics
from serving.server import create_server
from serving.errors import ServingError
from test_serving_units import tensor_protos

CODE = grpc.StatusCode
NOISE = np.random.default_rng(1).standard_normal((2, 100)).astype(np.float32)
ROW = [0.0] * 100  # one valid noise row
MATMUL_RANK = "In[0] ndims must be >= 2"  # oneDNN's MatMul on a wrong-rank input (AVX-512 CPUs)
# What must never reach a client: tracebacks, source paths, Python exception class names.
LEAK = re.compile(r"Traceback|File \"|\.py\b|site-packages|\b(Value|Type|Key|Index|Attribute|Runtime|"
                  r"Overflow|Recursion|UnicodeDecode|Assertion|Name|ZeroDivision|Memory|OS)Error\b")


def assert_clean(message: str, mentions=()) -> None:
    """The message names what is wrong and carries no Python internals."""
    assert not LEAK.search(message), message
    for fragment in mentions:
        alternatives = fragment if isinstance(fragment, tuple) else (fragment,)  # a tuple: any one of them
        assert any(text in message for text in alternatives), (fragment, message)


# ---------------- request builders ----------------
def tensor(dtype, shape, **fields) -> tensor_pb2.TensorProto:
    result = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        result.tensor_shape.dim.add(size=size)
    return result


def predict(model="digitgan", signature="", version=None, label=None, outputs=(), **inputs):
    """A PredictRequest; numpy inputs are encoded as a real client does (tf.make_tensor_proto)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.output_filter.extend(outputs)
    for alias, value in inputs.items():
        proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        request.inputs[alias].CopyFrom(proto)
    return request


def with_content(array: np.ndarray, extra_bytes: int) -> tensor_pb2.TensorProto:
    """The array's TensorProto with tensor_content cut short (< 0) or padded (> 0)."""
    proto = tf.make_tensor_proto(array)
    content = proto.tensor_content
    proto.tensor_content = content[:extra_bytes] if extra_bytes < 0 else content + b"\0" * extra_bytes
    return proto


def oversized(server) -> predict_pb2.PredictRequest:
    """A request just over the server's gRPC message limit."""
    proto = tf.make_tensor_proto(NOISE)
    proto.tensor_content = b"\0" * (server.config.max_message_bytes + 1)
    return predict(noise=proto)


@dataclasses.dataclass(frozen=True)
class RawCall:
    """Bytes sent as-is to a gRPC method, for what a stub cannot express."""
    method: str
    payload: bytes


def images_of(response) -> np.ndarray:
    return tf.make_ndarray(response.outputs["images"])


def nan_or_unit_interval(images: np.ndarray) -> None:
    """NaN/Inf noise is computed, as TF Serving does; outputs are NaN or valid pixels."""
    assert images.shape[1:] == (28, 28, 1) and len(images) > 0
    assert np.all(np.isnan(images) | ((images >= 0) & (images <= 1)))


def empty_batch(images: np.ndarray) -> None:
    assert images.shape == (0, 28, 28, 1)


# ---------------- 1a. the gRPC table ----------------
def grpc_case(case_id, build, code, *mentions, check=None):
    return pytest.param(build, code, mentions, check, id=case_id)


GRPC_CASES = [
    # model spec
    grpc_case("empty-request", lambda s: predict_pb2.PredictRequest(), CODE.INVALID_ARGUMENT, "Missing ModelSpec"),
    grpc_case("empty-model-name", lambda s: predict(model="", noise=NOISE), CODE.INVALID_ARGUMENT,
              "ModelSpec has no name specified."),
    grpc_case("unknown-model", lambda s: predict(model="nope", noise=NOISE), CODE.NOT_FOUND,
              "Servable not found for request: Latest(nope)"),
    grpc_case("unknown-version", lambda s: predict(version=42, noise=NOISE), CODE.NOT_FOUND,
              "Servable not found for request: Specific(digitgan, 42)"),
    grpc_case("unknown-label", lambda s: predict(label="canary", noise=NOISE), CODE.INVALID_ARGUMENT,
              "Unrecognized servable version label: canary"),
    grpc_case("unknown-signature", lambda s: predict(signature="nosig", noise=NOISE), CODE.FAILED_PRECONDITION,
              'Serving signature key "nosig" not found.'),
    # input aliases
    grpc_case("missing-input", lambda s: predict(), CODE.INVALID_ARGUMENT,
              "input size does not match signature: 0!=1", "Missing but required: {noise}"),
    grpc_case("missing-one-of-two", lambda s: predict(signature="conditional", noise=NOISE), CODE.INVALID_ARGUMENT,
              "Missing but required: {digit}"),
    grpc_case("extra-input", lambda s: predict(noise=NOISE, extra=NOISE), CODE.INVALID_ARGUMENT,
              "Sent extra: {extra}"),
    grpc_case("unknown-alias", lambda s: predict(other=NOISE), CODE.INVALID_ARGUMENT,
              "Signature input alias: noise(", "Inputs expected to be in the request {other}"),
    grpc_case("unknown-output-filter", lambda s: predict(outputs=["nope"], noise=NOISE), CODE.INVALID_ARGUMENT,
              "output tensor alias not found in signature: nope", "{images}"),
    grpc_case("duplicate-output-filter", lambda s: predict(outputs=["images", "images"], noise=NOISE),
              CODE.INVALID_ARGUMENT, "duplicate output tensor alias: images"),
    # dtypes: the runtime rejects them, as in TF Serving (its text differs, the code does not)
    grpc_case("noise-float64", lambda s: predict(noise=NOISE.astype(np.float64)), CODE.INVALID_ARGUMENT,
              "double", "float", "noise"),
    grpc_case("noise-int32", lambda s: predict(noise=NOISE.astype(np.int32)), CODE.INVALID_ARGUMENT,
              "int32", "float", "noise"),
    grpc_case("noise-string", lambda s: predict(noise=np.full((2, 100), b"0.5", dtype=object)),
              CODE.INVALID_ARGUMENT, "string", "float", "noise"),
    grpc_case("noise-bool", lambda s: predict(noise=NOISE > 0), CODE.INVALID_ARGUMENT, "bool", "float", "noise"),
    grpc_case("digit-float", lambda s: predict(signature="conditional", noise=NOISE,
                                               digit=np.array([1.0, 2.0], np.float32)),
              CODE.INVALID_ARGUMENT, "float", "int32", "digit"),
    grpc_case("dtype-999", lambda s: predict(noise=tensor(999, [1])), CODE.INVALID_ARGUMENT,
              "tensor parsing error: noise", "unsupported tensor dtype 999"),
    grpc_case("dtype-resource", lambda s: predict(noise=tensor(types_pb2.DT_RESOURCE, [1])), CODE.INVALID_ARGUMENT,
              "tensor parsing error: noise", "DT_RESOURCE"),
    # ranks and dims (not pre-validated by TF Serving: the graph's ops reject them). The MatMul kernel,
    # and so its message, depends on the CPU: TensorFlow's oneDNN kernel on AVX-512 CPUs says "ndims".
    grpc_case("rank-1", lambda s: predict(noise=NOISE[0]), CODE.INVALID_ARGUMENT, ("[100]", MATMUL_RANK)),
    grpc_case("rank-3", lambda s: predict(noise=NOISE[None]), CODE.INVALID_ARGUMENT, ("[1,2,100]", MATMUL_RANK)),
    # Several graph ops reject a scalar and nothing orders them, so any one's message may come back.
    grpc_case("scalar", lambda s: predict(noise=np.float32(1.0)), CODE.INVALID_ARGUMENT,
              ("slice index 0 of dimension 0 out of bounds", "different ndims: [] vs.", MATMUL_RANK)),
    grpc_case("wrong-inner-dim", lambda s: predict(noise=NOISE[:, :7]), CODE.INVALID_ARGUMENT,
              "Matrix size-incompatible", "[2,7]"),
    grpc_case("zero-batch", lambda s: predict(noise=np.zeros((0, 100), np.float32)), CODE.OK, check=empty_batch),
    grpc_case("zero-inner-dim", lambda s: predict(noise=np.zeros((2, 0), np.float32)), CODE.INVALID_ARGUMENT,
              "Matrix size-incompatible", "[2,0]"),
    grpc_case("negative-dim", lambda s: predict(noise=tensor(types_pb2.DT_FLOAT, [-5, 100], float_val=[1.0])),
              CODE.INVALID_ARGUMENT, "tensor parsing error: noise", "negative dimension"),
    grpc_case("unknown-rank", lambda s: predict(noise=tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape={"unknown_rank": True})), CODE.INVALID_ARGUMENT,
        "tensor parsing error: noise", "unknown rank"),
    # declared shapes against payloads: nothing is allocated beyond max_request_elements
    grpc_case("huge-shape-one-value", lambda s: predict(
        noise=tensor(types_pb2.DT_FLOAT, [10000, 28, 28, 1], float_val=[1.0])), CODE.INVALID_ARGUMENT,
        "tensor parsing error: noise", "more than the limit"),
    grpc_case("huge-shape-no-values", lambda s: predict(noise=tensor(types_pb2.DT_FLOAT, [1_000_000, 100])),
              CODE.INVALID_ARGUMENT, "tensor parsing error: noise", "more than the limit"),
    grpc_case("overflowing-shape", lambda s: predict(
        noise=tensor(types_pb2.DT_FLOAT, [2**62, 2**62], float_val=[1.0])), CODE.INVALID_ARGUMENT,
        "tensor parsing error: noise", "too large"),
    grpc_case("more-values-than-shape", lambda s: predict(
        noise=tensor(types_pb2.DT_FLOAT, [1, 2], float_val=[1.0, 2.0, 3.0])), CODE.INVALID_ARGUMENT,
        "tensor parsing error: noise", "holds only 2"),
    grpc_case("tensor-content-short", lambda s: predict(noise=with_content(NOISE, -4)), CODE.INVALID_ARGUMENT,
              "tensor parsing error: noise", "tensor_content has 796 bytes", "needs 800"),
    grpc_case("tensor-content-long", lambda s: predict(noise=with_content(NOISE, 3)), CODE.INVALID_ARGUMENT,
              "tensor parsing error: noise", "tensor_content has 803 bytes"),
    grpc_case("string-tensor-content", lambda s: predict(
        noise=tensor(types_pb2.DT_STRING, [1], tensor_content=b"abc")), CODE.INVALID_ARGUMENT,
        "tensor parsing error: noise", "string tensors cannot use tensor_content"),
    # values
    grpc_case("nan-noise", lambda s: predict(noise=np.full((2, 100), np.nan, np.float32)), CODE.OK,
              check=nan_or_unit_interval),
    grpc_case("inf-noise", lambda s: predict(noise=np.where(NOISE > 0, np.inf, -np.inf).astype(np.float32)),
              CODE.OK, check=nan_or_unit_interval),
    grpc_case("digit-10", lambda s: predict(signature="sample", digit=np.array([10], np.int32),
                                            seed=np.array([1], np.int64)),
              CODE.INVALID_ARGUMENT, "digit must be in 0..9", "[10]"),
    grpc_case("digit-minus-1", lambda s: predict(signature="conditional", noise=NOISE,
                                                 digit=np.array([3, -1], np.int32)),
              CODE.INVALID_ARGUMENT, "digit must be in 0..9", "[3 -1]"),
    grpc_case("digit-int32-max", lambda s: predict(signature="sample", digit=np.array([2**31 - 1], np.int32),
                                                   seed=np.array([1], np.int64)),
              CODE.INVALID_ARGUMENT, "digit must be in 0..9"),
    grpc_case("digit-batch-mismatch", lambda s: predict(signature="conditional", noise=NOISE,
                                                        digit=np.array([1, 2, 3], np.int32)),
              CODE.INVALID_ARGUMENT, "Incompatible shapes", "[2,784]", "[3,1]"),
    grpc_case("tf1-model-string-input", lambda s: predict(model="half", x=np.array([[b"a"]], dtype=object)),
              CODE.INVALID_ARGUMENT, "string", "float"),
    # transport
    grpc_case("oversized-message", oversized, CODE.RESOURCE_EXHAUSTED, "Received message larger than max"),
    grpc_case("malformed-protobuf", lambda s: RawCall("/tensorflow.serving.PredictionService/Predict",
                                                      b"\xff\xff\xff\xff"),
              CODE.INTERNAL),
    grpc_case("unknown-method", lambda s: RawCall("/tensorflow.serving.PredictionService/Nope", b""),
              CODE.UNIMPLEMENTED, "Method not found"),
]


def call_grpc(channel, request):
    if isinstance(request, RawCall):
        return channel.unary_unary(request.method)(request.payload, timeout=30)
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 30)


@pytest.mark.parametrize("build,code,mentions,check", GRPC_CASES)
def test_malformed_grpc(server, channel, build, code, mentions, check):
    request = build(server)
    if code == CODE.OK:
        check(images_of(call_grpc(channel, request)))
        return
    with pytest.raises(grpc.RpcError) as info:
        call_grpc(channel, request)
    assert info.value.code() == code, info.value.details()
    assert_clean(info.value.details() or "", mentions)


# ---------------- 1b. the REST table ----------------
PREDICT = "/v1/models/digitgan:predict"
BIG_VERSION = "9" * 20  # >= 2**63
HUGE_VERSION = "9" * 5000  # over Python's 4300-digit int() limit


def as_json(document) -> bytes:
    return json.dumps(document).encode()


def rest_case(case_id, method, path, body, status, *mentions, check=None, content_length=None):
    return pytest.param(method, path, body, content_length, status, mentions, check, id=case_id)


def rest_images(document) -> np.ndarray:
    return np.array(document["predictions"], np.float32)


REST_CASES = [
    # model spec in the URL
    rest_case("unknown-model", "POST", "/v1/models/nope:predict", as_json({"instances": [ROW]}), 404,
              "Servable not found for request: Latest(nope)"),
    rest_case("unknown-version", "POST", "/v1/models/digitgan/versions/42:predict", as_json({"instances": [ROW]}),
              404, "Servable not found for request: Specific(digitgan, 42)"),
    rest_case("unknown-label", "POST", "/v1/models/digitgan/labels/canary:predict", as_json({"instances": [ROW]}),
              400, "Unrecognized servable version label: canary"),
    rest_case("unknown-signature", "POST", PREDICT, as_json({"signature_name": "nosig", "instances": [ROW]}), 400,
              'Serving signature name: "nosig" not found in signature def'),
    rest_case("signature-not-string", "POST", PREDICT, as_json({"signature_name": 5, "instances": [ROW]}), 400,
              "'signature_name' must be a string"),
    # regression: these four were 500 "internal error" (int() limits, protobuf int64 range)
    rest_case("version-over-int64", "POST", f"/v1/models/digitgan/versions/{BIG_VERSION}:predict",
              as_json({"instances": [ROW]}), 400, f"Failed to convert version: {BIG_VERSION} to numeric."),
    rest_case("version-5000-digits", "POST", f"/v1/models/digitgan/versions/{HUGE_VERSION}:predict",
              as_json({"instances": [ROW]}), 400, "Failed to convert version: 9999", "...TRUNCATED"),
    rest_case("status-version-over-int64", "GET", f"/v1/models/digitgan/versions/{BIG_VERSION}", None, 400,
              f"Failed to convert version: {BIG_VERSION} to numeric."),
    rest_case("status-version-5000-digits", "GET", f"/v1/models/digitgan/versions/{HUGE_VERSION}", None, 400,
              "Failed to convert version: 9999"),
    # paths and methods
    rest_case("malformed-path", "GET", "/v1/foo/bar", None, 400, "Malformed request: GET /v1/foo/bar"),
    rest_case("get-on-predict", "GET", PREDICT, None, 400, f"Malformed request: GET {PREDICT}"),
    # regression: unsupported methods were http.server's 501 HTML page
    rest_case("put-method", "PUT", PREDICT, as_json({"instances": [ROW]}), 400, f"Malformed request: PUT {PREDICT}"),
    rest_case("delete-method", "DELETE", "/v1/models/digitgan", None, 400,
              "Malformed request: DELETE /v1/models/digitgan"),
    # input aliases
    # (json_tensor.cc: columnar "inputs" looks up each signature input and ignores other keys;
    # every row object must have exactly the signature's inputs)
    rest_case("missing-input", "POST", PREDICT, as_json({"inputs": {}}), 400,
              "Missing named input: noise in 'inputs' object."),
    rest_case("missing-named-input", "POST", PREDICT, as_json({"signature_name": "sample",
                                                              "instances": [{"digit": 1}]}),
              400, "Failed to process element: 0 of 'instances' list", "keys must be equal to: digit,seed"),
    rest_case("extra-input", "POST", PREDICT, as_json({"inputs": {"noise": [ROW], "extra": [ROW]}}), 200,
              check=lambda document: nan_or_unit_interval(np.array(document["outputs"], np.float32))),
    rest_case("extra-row-input", "POST", PREDICT, as_json({"instances": [{"noise": ROW, "extra": 1}]}), 400,
              "Failed to process element: 0 key: extra of 'instances' list",
              "does not have named input: extra"),
    rest_case("instances-differ-in-names", "POST", PREDICT, as_json(
        {"signature_name": "sample", "instances": [{"digit": 1, "seed": 1}, {"digit": 2}]}), 400,
        "Failed to process element: 1 of 'instances' list", "keys must be equal to: digit,seed"),
    # JSON types
    rest_case("noise-strings", "POST", PREDICT, as_json({"instances": [["0.5"] * 100]}), 400,
              '"0.5" is not of expected type: float'),
    rest_case("noise-bools", "POST", PREDICT, as_json({"instances": [[True] * 100]}), 400,
              "true is not of expected type: float"),
    rest_case("noise-null", "POST", PREDICT, as_json({"inputs": None}), 400, "null is not of expected type: float"),
    rest_case("noise-b64", "POST", PREDICT, as_json({"instances": [{"b64": "AAAA"}]}), 400,
              '{"b64": "AAAA"} is not of expected type: float'),
    rest_case("digit-float", "POST", PREDICT, as_json({"signature_name": "conditional",
                                                      "inputs": {"noise": [ROW], "digit": [1.5]}}),
              400, "1.5 is not of expected type: int32"),
    rest_case("digit-over-int32", "POST", PREDICT, as_json({"signature_name": "conditional",
                                                           "inputs": {"noise": [ROW], "digit": [2**31]}}),
              400, "digit", "out of range for DT_INT32"),
    rest_case("number-too-big-for-float", "POST", PREDICT, as_json({"instances": [[10**400] + ROW[1:]]}), 400,
              "JSON Parse error: Number too big to be stored in double. at offset: "),  # rapidjson's words
    rest_case("instances-number", "POST", PREDICT, as_json({"instances": 5}), 400,
              "'instances' must be a non-empty JSON list"),
    rest_case("instances-object", "POST", PREDICT, as_json({"instances": {"noise": [ROW]}}), 400,
              "'instances' must be a non-empty JSON list"),
    rest_case("instances-empty", "POST", PREDICT, as_json({"instances": []}), 400,
              "'instances' must be a non-empty JSON list"),
    rest_case("ragged-rows", "POST", PREDICT, as_json({"instances": [ROW, ROW[:99]]}), 400,
              "noise", "rectangular"),
    rest_case("ragged-depth", "POST", PREDICT, as_json({"instances": [ROW[:99] + [[0.0]]]}), 400,
              "noise", "rectangular"),
    rest_case("mixed-instances", "POST", PREDICT, as_json({"instances": [{"noise": ROW}, ROW]}), 400,
              "Expecting object but got list at item 1"),
    rest_case("instances-and-inputs", "POST", PREDICT, as_json({"instances": [ROW], "inputs": [ROW]}), 400,
              "exactly one of 'instances'"),
    rest_case("neither-instances-nor-inputs", "POST", PREDICT, as_json({}), 400, "exactly one of 'instances'"),
    rest_case("body-not-object", "POST", PREDICT, as_json([ROW]), 400, "Is not object"),
    rest_case("classify-object-feature", "POST", "/v1/models/half:classify",
              as_json({"signature_name": "classify_x_to_y", "examples": [{"x": [{"a": {"b": 1}}]}]}), 400,
              "Feature: x has element with unexpected JSON type: Object"),
    # shapes and values
    rest_case("rank-1", "POST", PREDICT, as_json({"inputs": ROW}), 400, ("[100]", MATMUL_RANK)),
    rest_case("wrong-inner-dim", "POST", PREDICT, as_json({"instances": [ROW[:7]]}), 400,
              "Matrix size-incompatible", "[1,7]"),
    rest_case("zero-inner-dim", "POST", PREDICT, as_json({"instances": [[]]}), 400,
              "Matrix size-incompatible", "[1,0]"),
    rest_case("nan-noise", "POST", PREDICT, b'{"instances": [[' + b", ".join([b"NaN"] * 100) + b"]]}", 200,
              check=lambda document: nan_or_unit_interval(rest_images(document))),
    rest_case("inf-noise", "POST", PREDICT, b'{"instances": [[' + b", ".join([b"Infinity", b"-Infinity"] * 50)
              + b"]]}", 200, check=lambda document: nan_or_unit_interval(rest_images(document))),
    rest_case("digit-12", "POST", PREDICT, as_json({"signature_name": "sample",
                                                   "instances": [{"digit": 12, "seed": 1}]}),
              400, "digit must be in 0..9", "[12]"),
    # bodies
    rest_case("invalid-json", "POST", PREDICT, b"{not json", 400, "JSON Parse error", "at offset: 1"),
    rest_case("empty-body", "POST", PREDICT, b"", 400, "JSON Parse error: The document is empty"),
    # rapidjson does not check UTF-8: the body parses, and the string is not a list
    rest_case("invalid-utf8", "POST", PREDICT, b'{"instances": "\xff\xfe"}', 400, "'instances'"),
    rest_case("nested-100000-deep", "POST", PREDICT, b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400,
              "JSON Parse error"),
    rest_case("number-5000-digits", "POST", PREDICT, b'{"instances": [' + b"1" * 5000 + b"]}", 400,
              "JSON Parse error"),
    rest_case("body-over-limit", "POST", PREDICT, None, 413, "exceeds the limit",
              content_length=lambda server: server.config.max_message_bytes + 1),
    rest_case("bad-content-length", "POST", PREDICT, None, 400, "Invalid Content-Length header",
              content_length=lambda server: "abc"),
]


def http_call(port: int, method: str, path: str, body: bytes | None, content_length=None):
    """(status, Content-Type, parsed JSON body) of one request on a fresh connection.

    `content_length` sends that header with no body, to test the limit checks on their own.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if content_length is None:
            connection.request(method, path, body=body)
        else:
            connection.putrequest(method, path)
            connection.putheader("Content-Length", str(content_length))
            connection.endheaders()
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("method,path,body,content_length,status,mentions,check", REST_CASES)
def test_malformed_rest(server, method, path, body, content_length, status, mentions, check):
    declared = content_length(server) if content_length is not None else None
    got_status, content_type, document = http_call(server.rest_port, method, path, body, declared)
    assert (got_status, content_type) == (status, "application/json"), document
    if status == 200:
        check(document)
        return
    assert set(document) == {"error"}
    assert_clean(document["error"], mentions)


@pytest.mark.parametrize("raw,status,mentions", [
    # Each request ends where the server stops reading: unread bytes would reset the connection.
    pytest.param(b"GARBAGE\r\n", None, "Bad request syntax", id="garbage-request-line"),
    pytest.param(b"GET /" + b"a" * (65537 - 5), 414, "Request-URI Too Long", id="uri-too-long"),
    pytest.param(b"FOO /v1/models/digitgan HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 400,
                 "Malformed request: FOO /v1/models/digitgan", id="unknown-method"),
])
def test_http_level_errors_are_json(server, raw, status, mentions):
    """Regression: errors raised inside http.server came back as its HTML page.
    (A bare request line is HTTP/0.9 to http.server, so that reply has no status line.)"""
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as connection:
        connection.sendall(raw)
        reply = b"".join(iter(lambda: connection.recv(65536), b""))
    if status is not None:
        head, _, reply = reply.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Content-Type: application/json" in head
    assert_clean(json.loads(reply)["error"], [mentions])


def nested(depth: int, leaf=1.0):
    """{"a": {"a": ... leaf}} built without recursion (too deep for json.dumps)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deeply_nested_leaf_is_a_clear_error():
    """Regression: an error message quoted the offending value with json.dumps, whose
    RecursionError on a deep value turned a client mistake into a 500 "internal error".
    (Over HTTP the parser's own depth limit is close, so this is tested on the parsed value.)"""
    for convert, mention in (
            (lambda value: json_tensor.json_to_array([value], types_pb2.DT_FLOAT, "noise"), "(a deeply nested object)"),
            (lambda value: json_tensor.json_to_array([value], types_pb2.DT_STRING, "noise"), "(a deeply nested object)"),
            (lambda value: json_tensor.examples_input({"examples": [{"x": [value]}]}), "unexpected JSON type: Object")):
        with pytest.raises(ServingError) as info:
            convert(nested(5000))
        assert info.value.code == CODE.INVALID_ARGUMENT
        assert_clean(info.value.message, [mention])


def test_server_still_serves_after_malformed_requests(server, channel):
    """Runs after both tables (file order): the server still gives correct answers."""
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict(noise=NOISE), 30)
    np.testing.assert_allclose(images_of(response), models.expected_images(NOISE), rtol=1e-5, atol=1e-6)
    status, _, document = http_call(server.rest_port, "POST", PREDICT, as_json({"instances": NOISE.tolist()}))
    assert status == 200
    np.testing.assert_allclose(rest_images(document), models.expected_images(NOISE), rtol=1e-5, atol=1e-6)


# ---------------- 2. fuzzing ----------------
FUZZ_EXAMPLES = int(os.environ.get("DIGITGAN_FUZZ_EXAMPLES", "200"))
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_ELEMENT_LIMIT = 2_000  # keeps each example cheap; the limit check itself is what is fuzzed
# Codes a malformed request may get; INTERNAL/UNKNOWN would mean an unexpected exception.
CLIENT_ERRORS = {CODE.INVALID_ARGUMENT, CODE.FAILED_PRECONDITION, CODE.NOT_FOUND}


@st.composite
def noise_like_protos(draw):
    """TensorProtos near the valid float [n, 100] noise, where the graph code is reached."""
    rows = draw(st.integers(0, 3))
    width = draw(st.sampled_from([100, 100, 99, 0, 1]))
    dtype = draw(st.sampled_from([types_pb2.DT_FLOAT, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32]))
    values = draw(st.lists(st.floats(width=32), max_size=rows * width))
    proto = tensor(dtype, [rows, width])
    if dtype == types_pb2.DT_INT32:
        proto.int_val.extend(int(v) for v in values if np.isfinite(v) and abs(v) < 2**31)
    else:
        getattr(proto, "float_val" if dtype == types_pb2.DT_FLOAT else "double_val").extend(values)
    return proto


@st.composite
def digit_protos(draw):
    digits = draw(st.lists(st.integers(-3, 12), min_size=0, max_size=4))
    dtype = draw(st.sampled_from([types_pb2.DT_INT32, types_pb2.DT_INT64]))
    proto = tensor(dtype, [len(digits)])
    getattr(proto, "int_val" if dtype == types_pb2.DT_INT32 else "int64_val").extend(digits)
    return proto


@st.composite
def predict_requests(draw):
    """Random PredictRequests: real and unknown names, versions, aliases and tensors."""
    request = predict_pb2.PredictRequest()
    if draw(st.integers(0, 9)) > 0:  # sometimes no model_spec at all
        spec = request.model_spec
        spec.name = draw(st.sampled_from(["digitgan", "digitgan", "half", "nope", ""]))
        spec.signature_name = draw(st.sampled_from(["", "conditional", "sample", "nosig"]))
        choice = draw(st.sampled_from(["latest", "version", "label"]))
        if choice == "version":
            spec.version.value = draw(st.sampled_from([1, 2, -1, 2**63 - 1]))
        elif choice == "label":
            spec.version_label = draw(st.sampled_from(["stable", "canary", ""]))
    aliases = draw(st.lists(st.sampled_from(["noise", "digit", "seed", "x", "other", ""]), max_size=3, unique=True))
    for alias in aliases:
        strategy = {"noise": noise_like_protos(), "x": noise_like_protos(),
                    "digit": digit_protos(), "seed": digit_protos()}.get(alias, tensor_protos())
        request.inputs[alias].CopyFrom(draw(st.one_of(strategy, tensor_protos())))
    request.output_filter.extend(draw(st.lists(st.sampled_from(["images", "png_bytes", "y", "nope"]), max_size=2)))
    return request


def predict_in_process(manager, request):
    """The gRPC Predict path minus the transport: resolve the spec, parse, run, encode."""
    runner = request_runner.RequestRunner(manager)
    return runner.with_version(request.model_spec, request.HasField("model_spec"),
                               lambda loaded: inference.predict(loaded, request, FUZZ_ELEMENT_LIMIT))


def assert_response_or_clear_error(manager, request) -> None:
    try:
        response = predict_in_process(manager, request)
    except ServingError as error:  # any other exception fails the test, with its traceback
        assert error.code in CLIENT_ERRORS, (error.code, error.message)
        assert_clean(error.message)
        return
    assert response.outputs and response.model_spec.version.value == 1


@FUZZ_SETTINGS
@given(request=predict_requests())
def test_fuzz_predict_requests(server, request):
    """Random PredictRequests: a response or a ServingError with a client-error code."""
    assert_response_or_clear_error(server.manager, request)


SEED_REQUESTS = [
    predict(noise=NOISE[:1]).SerializeToString(),
    predict(signature="conditional", noise=NOISE[:1], digit=np.array([3], np.int32)).SerializeToString(),
    predict(model="half", x=np.array([[1.0]], np.float32)).SerializeToString(),
]


@st.composite
def mutated_request_bytes(draw):
    """A valid serialized request with a few bytes replaced, inserted or cut (atheris-style)."""
    data = bytearray(draw(st.sampled_from(SEED_REQUESTS)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "truncate"]))
        if action == "replace" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[position:]
    return bytes(data)


@FUZZ_SETTINGS
@given(payload=mutated_request_bytes())
def test_fuzz_serialized_requests(server, channel, payload):
    """Bytes that do not parse are gRPC's INTERNAL "Exception deserializing request!" (its
    handler never runs); bytes that do parse must get a response or a ServingError."""
    try:
        request = predict_pb2.PredictRequest.FromString(payload)
    except protobuf_message.DecodeError:
        request = None
    if request is not None:
        assert_response_or_clear_error(server.manager, request)
    else:  # sent to the server as they are
        with pytest.raises(grpc.RpcError) as info:
            call_grpc(channel, RawCall("/tensorflow.serving.PredictionService/Predict", payload))
        assert (info.value.code(), info.value.details()) == (CODE.INTERNAL, "Exception deserializing request!")


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=4),
                        st.fixed_dictionaries({"b64": st.sampled_from(["AAAA", "!!", ""])}))
ANY_JSON = st.recursive(JSON_LEAVES, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=12)


@st.composite
def json_tensors(draw):
    """Nested lists shaped like tensors (sometimes ragged), with mostly numeric leaves; the
    innermost dim is sometimes 100, the width of a valid noise row."""
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    if shape and draw(st.booleans()):
        shape[-1] = 100
    leaf = st.one_of(st.floats(width=32), st.integers(-20, 20), JSON_LEAVES)

    def build(dims):
        if not dims:
            return draw(leaf)
        size = dims[0] if draw(st.integers(0, 9)) else draw(st.integers(0, 3))  # 10% ragged
        if size == 100:  # a row: one drawn value, one odd one out, so examples stay small
            row = [draw(leaf)] * size
            row[draw(st.integers(0, size - 1))] = draw(leaf)
            return row
        return [build(dims[1:]) for _ in range(size)]
    return build(shape)


@st.composite
def rest_bodies(draw):
    """Predict, classify and regress bodies: mostly well-formed JSON, some byte-level damage."""
    document = {}
    if draw(st.booleans()):
        document["signature_name"] = draw(st.sampled_from(
            ["", "serving_default", "conditional", "sample", "regress_x_to_y", "classify_x_to_y", "nosig", 3]))
    value = st.one_of(json_tensors(), ANY_JSON, st.dictionaries(
        st.sampled_from(["noise", "digit", "seed", "x", "extra"]), json_tensors(), max_size=3))
    for key in draw(st.lists(st.sampled_from(["instances", "inputs", "examples", "context"]), max_size=2,
                             unique=True)):
        document[key] = draw(value)
    body = json.dumps(document).encode()
    if draw(st.integers(0, 9)) == 0:  # damage: cut it or splice in a random byte
        position = draw(st.integers(0, len(body)))
        body = body[:position] + draw(st.binary(max_size=1))
    return body


VERSIONS = st.from_regex(r"\A[0-9]{1,30}\Z")
REST_CALLS = st.tuples(st.just("POST"), st.sampled_from([
    "/v1/models/digitgan:predict", "/v1/models/digitgan/versions/1:predict",
    "/v1/models/digitgan/labels/stable:predict", "/v1/models/half:predict", "/v1/models/half:regress",
    "/v1/models/half:classify", "/v1/models/nope:predict", "/v1/models/digitgan:classify",
]) | st.builds(lambda digits: f"/v1/models/digitgan/versions/{digits}:predict", VERSIONS)) | st.tuples(
    st.just("GET"), st.builds(lambda digits, suffix: f"/v1/models/digitgan/versions/{digits}{suffix}",
                              VERSIONS, st.sampled_from(["", "/metadata"])))


@FUZZ_SETTINGS
@given(call=REST_CALLS, body=rest_bodies())
def test_fuzz_rest_json_bodies(server, call, body):
    """Random JSON bodies and versions through the REST API logic: 200 or a clean 4xx, never a 500."""
    api = rest_api.RestApi(server.manager, Metrics(), FUZZ_ELEMENT_LIMIT)
    method, path = call
    status, payload, content_type = api.handle(method, path, body if method == "POST" else None)
    assert content_type == "application/json"
    document = json.loads(payload)
    assert status in (200, 400, 404), document
    if status != 200:
        assert_clean(document["error"])


@FUZZ_SETTINGS
@given(value=st.one_of(json_tensors(), ANY_JSON),
       dtype=st.sampled_from([types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_INT64,
                              types_pb2.DT_BOOL, types_pb2.DT_STRING, types_pb2.DT_HALF, types_pb2.DT_UINT8]))
def test_fuzz_json_to_array(value, dtype):
    """The JSON -> tensor conversion alone: an array of that dtype or INVALID_ARGUMENT."""
    try:
        array = json_tensor.json_to_array(value, dtype, "alias")
    except ServingError as error:
        assert error.code == CODE.INVALID_ARGUMENT
        assert_clean(error.message, ["alias"] if "JSON Value" not in error.message else [])
        return
    expected = np.dtype(object) if dtype == types_pb2.DT_STRING else tensors.numpy_dtype(dtype)
    assert array.dtype == expected


def test_rest_and_grpc_refuse_too_many_elements_with_one_text(server):
    """REST hands arrays to inference.predict_arrays, gRPC protos to inference.predict: the same
    element limit, checked in the same order, with the same message."""
    limit = 150  # two noise rows are 200 elements
    status, payload, _ = rest_api.RestApi(server.manager, Metrics(), limit).handle(
        "POST", PREDICT, as_json({"instances": [ROW, ROW]}))
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="digitgan"))
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(NOISE))
    runner = request_runner.RequestRunner(server.manager)
    code, message, _ = runner.run_work(lambda: runner.with_version(
        request.model_spec, True, lambda loaded: inference.predict(loaded, request, limit)))
    expected = "tensor parsing error: noise: tensor shape [2, 100] has 200 elements, more than the limit of 150"
    assert (status, json.loads(payload)) == (400, {"error": expected})
    assert (code, message) == (CODE.INVALID_ARGUMENT, expected)


def test_predict_arrays_gives_what_predict_gives(server):
    """The array-level entry REST uses runs the same signature to the same outputs as Predict."""
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="digitgan"))
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(NOISE))
    loaded = server.manager.acquire(request.model_spec)
    try:
        name, outputs = inference.predict_arrays(loaded, "", {"noise": NOISE}, 1000)
        response = inference.predict(loaded, request, 1000)
    finally:
        loaded.release()
    assert name == response.model_spec.signature_name == "serving_default"
    assert sorted(outputs) == sorted(response.outputs)
    for alias, array in outputs.items():
        np.testing.assert_array_equal(array, tf.make_ndarray(response.outputs[alias]))


# ---------------- 3. deadlines and concurrency limits ----------------
def gate_request(signature="") -> predict_pb2.PredictRequest:
    return predict(model="gate", signature=signature, x=np.array([1.0], np.float32))


def request_count(server, status: str) -> int:
    """request_count{model_name="gate",status=...} from the server's Prometheus text."""
    pattern = rf':tensorflow:serving:request_count{{model_name="gate",status="{status}"}} (\d+)'
    found = re.search(pattern, server.metrics.render())
    return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def gate_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("gate") / "gate"
    models.build_gate(str(base / "1"))
    return base


@pytest.fixture(scope="module")
def start_gate_server(gate_base):
    """Starts servers of the gate model with extra ServeConfig settings; stops them after."""
    servers = []

    def start(**overrides):
        options = dict(model_base_path=str(gate_base), model_name="gate", port=0, rest_port=FREE_PORT,
                       poll_seconds=0, grace_seconds=1.0)
        options.update(overrides)
        server = create_server(ServeConfig(**options))
        server.start()
        servers.append(server)
        assert server.wait_until_ready(60)
        return server

    yield start
    for server in servers:
        if server.manager.all_models_available():
            Gate(server).release(1000)  # let anything still blocked finish, so stop() is quick
        server.stop(1.0)


QUEUED_DEADLINE_SECONDS = 2.0  # time enough to reach the queue on a busy machine; the test waits until it has


def queued_tasks(server) -> list:
    """The tasks waiting in the server's batching queues (not yet taken to run)."""
    with server.batcher._condition:
        return [task for queue in server.batcher._queues.values() for batch in queue for task in batch.tasks]


def test_expired_deadline_in_batching_queue_is_not_computed(start_gate_server):
    """Regression: a batched request whose deadline passed in the queue used to be run anyway."""
    server = start_gate_server(enable_batching=True, max_batch_size=1, num_batch_threads=1,
                               batch_timeout_micros=0, rest_port=0)
    gate = Gate(server)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        first = stub.Predict.future(gate_request(), 60)
        assert wait_for(lambda: gate.arrivals() == 1)  # the only batch thread is now blocked
        queued = stub.Predict.future(gate_request(), QUEUED_DEADLINE_SECONDS)
        # It waits in the batching queue behind the first (not refused on arrival), until its deadline passes.
        assert wait_for(lambda: len(queued_tasks(server)) == 1, timeout=QUEUED_DEADLINE_SECONDS), \
            f"the request did not reach the batching queue within its {QUEUED_DEADLINE_SECONDS} s deadline"
        (task,) = queued_tasks(server)
        with pytest.raises(grpc.RpcError) as info:
            queued.result()
        assert info.value.code() == CODE.DEADLINE_EXCEEDED
        # The server's deadline can be a little later than the client's (the timeout travels, not the
        # instant); the in-process server's clock is time.monotonic().
        assert wait_for(lambda: time.monotonic() > task.deadline)
        gate.release(1)
        assert list(first.result().outputs["y"].float_val) == [1.0]
    # The server has finished with the expired request (TF's BatchingSession code) ...
    assert wait_for(lambda: request_count(server, "RESOURCE_EXHAUSTED") == 1)
    # ... and it never reached the graph.
    assert gate.arrivals() == 1


def test_expired_deadline_skips_the_graph(start_gate_server):
    """The servicer's own check (test_serving_grpc.py has it with a stub work function) with
    the real Predict, model and counters: a spent deadline means no graph run."""
    server = start_gate_server(rest_port=0)
    gate = Gate(server)
    gate.release(1)  # if the graph ran, it would pass the gate and count an arrival

    class ExpiredContext:
        def time_remaining(self):
            return 0.0

        def abort(self, code, details):
            raise grpc.RpcError(code, details)

    servicer = prediction.PredictionService(request_runner.RequestRunner(server.manager, server.metrics), 1000)
    with pytest.raises(grpc.RpcError) as info:
        servicer.Predict(gate_request(), ExpiredContext())
    assert info.value.args[0] == CODE.DEADLINE_EXCEEDED
    assert gate.arrivals() == 0
    assert request_count(server, "DEADLINE_EXCEEDED") == 1


def post_json(port: int, body) -> tuple[int, dict]:
    status, _, document = http_call(port, "POST", "/v1/models/gate:predict", as_json(body))
    return status, document


def test_concurrency_limits_refuse_instead_of_queueing(start_gate_server):
    """With 2 gRPC and 2 REST requests held in the graph, a third of each is refused at once:
    gRPC RESOURCE_EXHAUSTED (grpc's maximum_concurrent_rpcs), REST 429 with JSON."""
    server = start_gate_server(max_concurrent_rpcs=2, max_concurrent_rest_requests=2)
    gate = Gate(server)
    add_one = {"signature_name": "add_one", "instances": [1.0]}
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, \
            concurrent.futures.ThreadPoolExecutor(2) as rest_pool:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        held_grpc = [stub.Predict.future(gate_request(), 60) for _ in range(2)]
        held_rest = [rest_pool.submit(post_json, server.rest_port, {"instances": [1.0]}) for _ in range(2)]
        try:
            assert wait_for(lambda: gate.arrivals() == 4)  # all four are inside the graph
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(gate_request("add_one"), 30)
            assert info.value.code() == CODE.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit exceeded" in info.value.details()
            status, document = post_json(server.rest_port, add_one)
            assert status == 429 and "Concurrent REST request limit of 2 exceeded" in document["error"]
            status, _, _ = http_call(server.rest_port, "GET", "/v1/models/gate", None)
            assert status == 200  # status probes are not limited
        finally:
            gate.release(4)
        assert [list(f.result().outputs["y"].float_val) for f in held_grpc] == [[1.0], [1.0]]
        assert [f.result() for f in held_rest] == [(200, {"predictions": [1.0]})] * 2
        # Slots free up once the held requests finish (the server may lag the client a bit).
        assert wait_for(lambda: served_grpc(stub))
        assert wait_for(lambda: post_json(server.rest_port, add_one) == (200, {"predictions": [2.0]}))
    assert gate.arrivals() == 4  # refused requests never reached the graph


def served_grpc(stub) -> bool:
    try:
        return list(stub.Predict(gate_request("add_one"), 30).outputs["y"].float_val) == [2.0]
    except grpc.RpcError as error:
        assert error.code() == CODE.RESOURCE_EXHAUSTED, error
        return False
