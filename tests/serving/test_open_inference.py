"""The Open Inference Protocol (KServe "v2") beside TF Serving's API, tested with a real client
library of the protocol (tritonclient.http and tritonclient.grpc) and raw HTTP, against real servers
on loopback: health, metadata, inference of each signature as its own v2 model, the binary tensor
data extension both ways, errors, metrics, batching shared with Predict, and the pretrained bundle
giving the same digits over v2 as over TF Serving's Predict.
"""

import http.client
import io
import json
import re
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import serving_test_models as models
from serving_test_models import wait_for
from serving.config import FREE_PORT

PRETRAINED = Path(__file__).resolve().parents[2] / "pretrained" / "digitgan"
HEADER_LENGTH = "Inference-Header-Content-Length"


# ---------------- clients ----------------
@pytest.fixture(scope="module")
def http_client(server):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.rest_port}", network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def clients(http_client, grpc_client):
    return ((triton_http, http_client), (triton_grpc, grpc_client))


def infer_input(module, name, array, datatype, binary=True):
    tensor = module.InferInput(name, list(array.shape), datatype)
    if module is triton_http:
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def sample_inputs(module, digits, seeds, binary=True):
    return [infer_input(module, "digit", np.asarray(digits, np.int32), "INT32", binary),
            infer_input(module, "seed", np.asarray(seeds, np.int64), "INT64", binary)]


def noise(rows, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, models.LATENT_DIM)).astype(np.float32)


def tf_predict(stub, signature, **inputs):
    """TF Serving's Predict over gRPC: output alias -> array."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digitgan"
    request.model_spec.signature_name = signature
    for alias, array in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
    response = stub.Predict(request, 60)
    return {alias: tf.make_ndarray(tensor) for alias, tensor in response.outputs.items()}


def rest(server, method, path, body=None, headers=None):
    """(status, headers, body) of one raw HTTP request to the REST port."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def rest_json(server, method, path, document=None):
    status, _headers, body = rest(server, method, path, None if document is None else json.dumps(document).encode())
    return status, json.loads(body)


def running_server(**settings):
    """A model server with REST on a free port and the given ServeConfig settings, ready to serve."""
    return models.running_server(**{"port": 0, "rest_port": FREE_PORT, "poll_seconds": 0, "grace_seconds": 1.0,
                                    **settings})


def grpc_error(call):
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# ---------------- health and metadata ----------------
def test_health_and_server_metadata(server, http_client, grpc_client):
    for _module, client in clients(http_client, grpc_client):
        assert client.is_server_live() and client.is_server_ready()
    assert rest_json(server, "GET", "/v2/health/live") == (200, {"live": True})
    assert rest_json(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    metadata = http_client.get_server_metadata()
    assert metadata["name"] == "digitgan" and metadata["extensions"] == ["binary_tensor_data"]
    assert grpc_client.get_server_metadata().extensions == ["binary_tensor_data"]


def test_model_metadata_one_v2_model_per_signature(http_client, grpc_client):
    expected = {
        "digitgan": ([("noise", "FP32", [-1, 100])], [("images", "FP32", [-1, 28, 28, 1])]),
        "digitgan.sample": ([("digit", "INT32", [-1]), ("seed", "INT64", [-1])],
                            [("images", "FP32", [-1, 28, 28, 1]), ("png_bytes", "BYTES", [-1])]),
        "digitgan.conditional": ([("digit", "INT32", [-1]), ("noise", "FP32", [-1, 100])],
                                 [("images", "FP32", [-1, 28, 28, 1])]),
    }
    for name, (inputs, outputs) in expected.items():
        for version in ("", "1", "stable"):  # latest, a number, a version label
            metadata = http_client.get_model_metadata(name, version)
            assert (metadata["name"], metadata["versions"], metadata["platform"]) == (name, ["1"], "tensorflow_savedmodel")
            assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == inputs
            assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == outputs
            response = grpc_client.get_model_metadata(name, version)
            assert (response.name, list(response.versions)) == (name, ["1"])
            assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == inputs
            assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == outputs
    # serving_default under its own name too, and the TF1 model, whose tensors have no known rank.
    assert http_client.get_model_metadata("digitgan.serving_default")["inputs"][0]["name"] == "noise"
    assert http_client.get_model_metadata("half")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1]}]
    assert http_client.get_model_metadata("half.regress_x_to_y")["inputs"][0]["datatype"] == "BYTES"


def test_model_ready(server, http_client, grpc_client):
    for _module, client in clients(http_client, grpc_client):
        for name, version in (("digitgan", ""), ("digitgan", "1"), ("digitgan.sample", "stable"), ("half", "")):
            assert client.is_model_ready(name, version), (name, version)
        for name, version in (("nope", ""), ("digitgan", "7"), ("digitgan.nosuch", ""), ("digitgan", "nolabel")):
            assert not client.is_model_ready(name, version), (name, version)
    assert rest_json(server, "GET", "/v2/models/digitgan.sample/versions/1/ready") == \
        (200, {"name": "digitgan.sample", "ready": True})
    status, body = rest_json(server, "GET", "/v2/models/digitgan/versions/7/ready")
    assert status == 400 and body["error"].startswith("Model version not ready: Servable not found")


# ---------------- inference ----------------
def test_serving_default_equals_predict(prediction_stub, http_client, grpc_client):
    rows = noise(3, seed=1)
    predicted = tf_predict(prediction_stub, "serving_default", noise=rows)["images"]
    np.testing.assert_allclose(predicted, models.expected_images(rows), rtol=1e-5, atol=1e-6)
    for module, client in clients(http_client, grpc_client):
        for binary in (True, False):  # HTTP: binary input data, or a JSON `data` array
            result = client.infer("digitgan", [infer_input(module, "noise", rows, "FP32", binary)],
                                  outputs=[module.InferRequestedOutput("images", binary_data=binary)]
                                  if module is triton_http else None)
            assert np.array_equal(result.as_numpy("images"), predicted)
            response = result.get_response()
            version = response["model_version"] if module is triton_http else response.model_version
            assert version == "1"


def test_sample_signature_equals_predict_and_png_decodes(prediction_stub, http_client, grpc_client):
    digits, seeds = [3, 0, 9], [11, 12, 13]
    predicted = tf_predict(prediction_stub, "sample", digit=np.array(digits, np.int32),
                           seed=np.array(seeds, np.int64))
    for module, client in clients(http_client, grpc_client):
        result = client.infer("digitgan.sample", sample_inputs(module, digits, seeds), request_id="r-1")
        assert np.array_equal(result.as_numpy("images"), predicted["images"])
        pngs = result.as_numpy("png_bytes")
        assert pngs.shape == (3,) and list(pngs) == list(predicted["png_bytes"])
        for png, image in zip(pngs, predicted["images"]):
            decoded = Image.open(io.BytesIO(png))
            assert (decoded.format, decoded.size, decoded.mode) == ("PNG", (28, 28), "L")
            assert np.array_equal(np.asarray(decoded), (image[..., 0] * 255).astype(np.uint8))  # the test model's cast
        response = result.get_response()
        assert (response["id"] if module is triton_http else response.id) == "r-1"


def test_requested_outputs_and_version_label(http_client, grpc_client):
    for module, client in clients(http_client, grpc_client):
        result = client.infer("digitgan.sample", sample_inputs(module, [1], [2]), model_version="stable",
                              outputs=[module.InferRequestedOutput("png_bytes")])
        assert result.as_numpy("images") is None and result.as_numpy("png_bytes").shape == (1,)


def test_binary_data_extension_raw_http(server):
    """The extension by hand: binary inputs after the JSON, one output as JSON and one as binary."""
    header = json.dumps({
        "inputs": [{"name": "digit", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
                   {"name": "seed", "shape": [2], "datatype": "INT64", "data": [5, 6]}],
        "outputs": [{"name": "images"}, {"name": "png_bytes", "parameters": {"binary_data": True}}]}).encode()
    body = header + struct.pack("<2i", 4, 8)
    status, headers, reply = rest(server, "POST", "/v2/models/digitgan.sample/infer", body,
                                  {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"})
    assert status == 200, reply
    assert headers["Content-Type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH])
    document = json.loads(reply[:length])
    images, png = document["outputs"]
    assert (images["name"], images["datatype"], images["shape"]) == ("images", "FP32", [2, 28, 28, 1])
    assert len(images["data"]) == 2 * 28 * 28  # flat, row-major
    size = png["parameters"]["binary_data_size"]
    assert "data" not in png and size == len(reply) - length
    raw, elements = reply[length:], []
    while raw:
        (item_length,) = struct.unpack_from("<I", raw)
        elements.append(raw[4:4 + item_length])
        raw = raw[4 + item_length:]
    assert len(elements) == 2 and all(Image.open(io.BytesIO(item)).size == (28, 28) for item in elements)
    # The same request with every input as JSON: the same images.
    plain = {"inputs": [{"name": "digit", "shape": [2], "datatype": "INT32", "data": [4, 8]},
                        {"name": "seed", "shape": [2], "datatype": "INT64", "data": [5, 6]}],
             "outputs": [{"name": "images"}]}
    status, reply = rest_json(server, "POST", "/v2/models/digitgan.sample/infer", plain)
    assert status == 200 and reply["outputs"][0]["data"] == images["data"]


def test_json_data_flat_or_nested(server):
    """`data` in row-major order, flattened or nested (curl's way in, JSON numbers out)."""
    rows = noise(2, seed=4)
    replies = []
    for data in (rows.reshape(-1).tolist(), rows.tolist()):
        document = {"inputs": [{"name": "noise", "shape": [2, 100], "datatype": "FP32", "data": data}]}
        status, reply = rest_json(server, "POST", "/v2/models/digitgan/infer", document)
        assert status == 200, reply
        replies.append(reply)
    assert replies[0] == replies[1]
    output = replies[0]["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("images", "FP32", [2, 28, 28, 1])
    images = np.array(output["data"], np.float32).reshape(output["shape"])
    np.testing.assert_allclose(images, models.expected_images(rows), rtol=1e-5, atol=1e-6)


def test_png_bytes_as_json_says_to_ask_for_binary(server):
    document = {"inputs": [{"name": "digit", "shape": [1], "datatype": "INT32", "data": [1]},
                           {"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]}]}
    status, body = rest_json(server, "POST", "/v2/models/digitgan.sample/infer", document)
    assert status == 400 and "not UTF-8 text" in body["error"] and '"binary_data": true' in body["error"]
    document["parameters"] = {"binary_data_output": True}  # every output as binary data
    status, headers, reply = rest(server, "POST", "/v2/models/digitgan.sample/infer", json.dumps(document).encode())
    assert status == 200 and int(headers[HEADER_LENGTH]) < len(reply)


# ---------------- errors ----------------
@pytest.mark.parametrize("name, version, fragment", [
    ("nope", "", "Request for unknown model: 'nope' is not found"),
    ("digitgan.nosuch", "", "has no signature 'nosuch'"),
    ("digitgan", "7", "Servable not found for request: Specific(digitgan, 7)"),
])
def test_unknown_model_signature_or_version_is_not_found(server, http_client, grpc_client, name, version, fragment):
    rows = noise(1)
    error = grpc_error(lambda: http_client.infer(name, [infer_input(triton_http, "noise", rows, "FP32")],
                                                 model_version=version))
    assert error.status() == "404" and fragment in error.message()
    error = grpc_error(lambda: grpc_client.infer(name, [infer_input(triton_grpc, "noise", rows, "FP32")],
                                                 model_version=version))
    assert error.status() == "StatusCode.NOT_FOUND" and fragment in error.message()
    assert grpc_error(lambda: grpc_client.get_model_metadata(name, version)).status() == "StatusCode.NOT_FOUND"
    status, body = rest_json(server, "GET", f"/v2/models/{name}" + (f"/versions/{version}" if version else ""))
    assert status == 404 and fragment in body["error"]


@pytest.mark.parametrize("inputs, fragment", [
    ([("noise", np.zeros((1, 100), np.int32), "INT32")], "unexpected datatype INT32 for inference input 'noise', "
                                                          "expecting FP32"),
    ([("noise", np.zeros((1, 50), np.float32), "FP32")], "unexpected shape for input 'noise' for model 'digitgan'. "
                                                           "Expected [-1, 100], got [1, 50]"),
    ([("noise", np.zeros((100,), np.float32), "FP32")], "Expected [-1, 100], got [100]"),
    ([("x", np.zeros((1, 100), np.float32), "FP32")], "unexpected inference input 'x'"),
    ([("noise", np.zeros((1, 100), np.float32), "FP32")] * 2, "input 'noise' is given more than once"),
])
def test_bad_input_is_invalid_argument(http_client, grpc_client, inputs, fragment):
    for module, client in clients(http_client, grpc_client):
        tensors = [infer_input(module, name, array, datatype) for name, array, datatype in inputs]
        error = grpc_error(lambda: client.infer("digitgan", tensors))
        assert error.status() in ("400", "StatusCode.INVALID_ARGUMENT") and fragment in error.message(), \
            (module.__name__, error.message())


def test_bad_values_are_invalid_argument(server, grpc_client):
    def infer(inputs, **extra):
        return rest_json(server, "POST", "/v2/models/digitgan.sample/infer", {"inputs": inputs, **extra})

    seed = {"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]}
    cases = [
        ([{"name": "digit", "shape": [1], "datatype": "INT32", "data": [10]}, seed], "digit must be in 0..9"),
        ([{"name": "digit", "shape": [2], "datatype": "INT32", "data": [1]}, seed], "1 values given, but shape [2]"),
        ([{"name": "digit", "shape": [1], "datatype": "INT32", "data": ["1"]}, seed], "is a string, not a INT32"),
        ([{"name": "digit", "shape": [1], "datatype": "INT32", "data": [2**31]}, seed], "out of range for INT32"),
        ([{"name": "digit", "shape": [1], "datatype": "INT32", "data": [1]}], "Missing but required: {seed}"),
        ([{"name": "digit", "shape": [-1], "datatype": "INT32", "data": [1]}, seed], "has a negative dimension"),
        ([{"name": "digit", "shape": [1], "datatype": "INT32"}, seed], "has neither 'data' nor"),
        ([], "'inputs' must be a non-empty JSON array"),
    ]
    for inputs, fragment in cases:
        status, body = infer(inputs)
        assert status == 400 and fragment in body["error"], (inputs, body)
    status, body = infer([{"name": "digit", "shape": [1], "datatype": "INT32", "data": [1]}, seed],
                         outputs=[{"name": "nope"}])
    assert status == 400 and "output tensor alias not found in signature: nope" in body["error"]
    # The same over gRPC: a digit the graph refuses, and raw contents that do not fit the shape.
    digit = triton_grpc.InferInput("digit", [1], "INT32")
    digit.set_data_from_numpy(np.array([12], np.int32))
    seeds = triton_grpc.InferInput("seed", [1], "INT64")
    seeds.set_data_from_numpy(np.array([1], np.int64))
    error = grpc_error(lambda: grpc_client.infer("digitgan.sample", [digit, seeds]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "digit must be in 0..9" in error.message()
    # Raw contents that do not fit the declared shape, sent with the client library's own messages.
    request = service_pb2.ModelInferRequest(model_name="digitgan.sample")
    request.inputs.add(name="digit", datatype="INT32", shape=[2])
    request.inputs.add(name="seed", datatype="INT64", shape=[2])
    request.raw_input_contents.extend([struct.pack("<2i", 1, 2), struct.pack("<q", 1)])  # one INT64 for two
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "input 'seed': 8 bytes of raw data, but shape [2] of INT64 needs 16"


def test_request_size_limit_is_checked_before_decoding(server):
    """max_request_elements holds for v2 as for Predict: refused on the declared shape, so a huge
    shape with no data behind it allocates nothing."""
    document = {"inputs": [{"name": "noise", "shape": [10_001, 100], "datatype": "FP32",
                            "parameters": {"binary_data_size": 0}}]}
    header = json.dumps(document).encode()
    status, _headers, reply = rest(server, "POST", "/v2/models/digitgan/infer", header, {HEADER_LENGTH: str(len(header))})
    assert status == 400
    assert "input 'noise': tensor shape [10001, 100] has 1000100 elements, more than the limit of 1000000" in \
        json.loads(reply)["error"]


def test_http_protocol_errors(server):
    assert rest_json(server, "GET", "/v2/models/digitgan/infer")[0] == 405
    assert rest_json(server, "POST", "/v2/models/digitgan", {})[0] == 405
    assert rest_json(server, "GET", "/v2/nothing/here") == (404, {"error": "Not Found"})
    status, _headers, body = rest(server, "POST", "/v2/models/digitgan/infer", b"{not json")
    assert status == 400 and "JSON Parse error" in json.loads(body)["error"]
    for length in ("x", "-1", "99999"):
        status, _headers, body = rest(server, "POST", "/v2/models/digitgan/infer", b"{}", {HEADER_LENGTH: length})
        assert status == 400 and HEADER_LENGTH in json.loads(body)["error"]
    header = json.dumps({"inputs": [{"name": "noise", "shape": [1, 100], "datatype": "FP32",
                                     "data": [0.0] * 100}]}).encode()
    status, _headers, body = rest(server, "POST", "/v2/models/digitgan/infer", header + b"extra",
                                  {HEADER_LENGTH: str(len(header))})
    assert status == 400 and "5 bytes of binary data after the JSON header belong to no input" in json.loads(body)["error"]


def test_metrics_count_v2_inference(server, http_client, grpc_client):
    rows = noise(1)
    for module, client in clients(http_client, grpc_client):
        client.infer("half", [infer_input(module, "x", np.ones((1, 1), np.float32), "FP32")])
        with pytest.raises(InferenceServerException):
            client.infer("half.nosuch", [infer_input(module, "x", rows, "FP32")])
    _status, _headers, page = rest(server, "GET", "/monitoring/prometheus/metrics")
    page = page.decode()
    assert re.search(r'request_latency_count\{model_name="half",API="infer",entrypoint="REST"\} [1-9]', page)
    assert re.search(r'request_latency_count\{model_name="half",API="ModelInfer",entrypoint="GRPC"\} [1-9]', page)
    assert int(re.search(r'request_count\{model_name="half",status="NOT_FOUND"\} (\d+)', page).group(1)) >= 2


# ---------------- batching ----------------
@pytest.mark.slow
def test_v2_rest_v2_grpc_and_predict_meet_in_one_batch(model_root):
    """One batcher behind both APIs: a batch of three rows runs only when full (its timeout is
    far away), and a Predict, a v2 gRPC and a v2 REST request fill it together."""
    with running_server(model_base_path=str(model_root / "digitgan"), enable_batching=True, max_batch_size=3,
                        batch_timeout_micros=120_000_000, num_batch_threads=1) as server:
        rows = {name: noise(1, seed) for seed, name in enumerate(("predict", "v2_grpc", "v2_rest"))}
        results, failures = {}, []

        def run(name, call):
            try:
                results[name] = call()
            except Exception as error:  # reported below
                failures.append((name, error))

        def predict():
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                return tf_predict(stub, "serving_default", noise=rows["predict"])["images"]

        def v2(module, port, name):
            client = module.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                return client.infer("digitgan", [infer_input(module, "noise", rows[name], "FP32")]).as_numpy("images")
            finally:
                client.close()

        calls = {"predict": predict, "v2_grpc": lambda: v2(triton_grpc, server.grpc_port, "v2_grpc"),
                 "v2_rest": lambda: v2(triton_http, server.rest_port, "v2_rest")}
        threads = []
        for count, (name, call) in enumerate(calls.items(), start=1):
            threads.append(threading.Thread(target=run, args=(name, call)))
            threads[-1].start()
            if count < 3:  # each waits in the open batch before the next is sent
                assert wait_for(lambda: server.batcher.waiting_tasks() == count)
        for thread in threads:
            thread.join(60)
        assert failures == [] and set(results) == set(calls)
        for name, images in results.items():
            np.testing.assert_allclose(images, models.expected_images(rows[name]), rtol=1e-5, atol=1e-6)


# ---------------- the pretrained bundle ----------------
@pytest.fixture(scope="module")
def pretrained_server():
    with running_server(model_base_path=str(PRETRAINED)) as server:
        yield server


@pytest.mark.slow
def test_pretrained_digits_over_v2_equal_predict(pretrained_server):
    """`serve --pretrained` gives a v2 client, over REST and gRPC, the very digits TF Serving's
    Predict gives for the same inputs: images equal element for element, PNGs byte for byte."""
    digits, seeds = np.arange(10, dtype=np.int32), np.arange(100, 110, dtype=np.int64)
    rows = noise(4, seed=7)
    with grpc.insecure_channel(f"127.0.0.1:{pretrained_server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        sample = tf_predict(stub, "sample", digit=digits, seed=seeds)
        default = tf_predict(stub, "serving_default", noise=rows)["images"]
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{pretrained_server.rest_port}", network_timeout=60)
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{pretrained_server.grpc_port}")
    try:
        for module, client in clients(http_client, grpc_client):
            result = client.infer("digitgan.sample", sample_inputs(module, digits, seeds))
            assert np.array_equal(result.as_numpy("images"), sample["images"])
            assert list(result.as_numpy("png_bytes")) == list(sample["png_bytes"])
            result = client.infer("digitgan", [infer_input(module, "noise", rows, "FP32")])
            assert np.array_equal(result.as_numpy("images"), default)
    finally:
        http_client.close()
        grpc_client.close()
