"""The TF1 half_plus_two graph model (Predict, Regress, Classify, MultiInference) and the REST API."""

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (classification_pb2, inference_pb2, predict_pb2, regression_pb2)


def example(x):
    item = example_pb2.Example()
    item.features.feature["x"].float_list.value.append(x)
    return item


def test_tf1_predict_any_shape(prediction_stub):
    # TF Serving does not check shapes against the signature: [1] works for a [-1,1] input.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[2.0])
    proto.tensor_shape.dim.add(size=1)
    request.inputs["x"].CopyFrom(proto)
    request.output_filter.append("y")
    response = prediction_stub.Predict(request, 10)
    assert list(response.outputs["y"].float_val) == [3.0]
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0], [4.0]], np.float32)))
    assert list(prediction_stub.Predict(request, 10).outputs["y"].float_val) == [2.5, 4.0]


def test_tf1_regress_classify_multi(prediction_stub):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "half"
    request.model_spec.signature_name = "regress_x_to_y"
    request.input.example_list.examples.extend([example(1.0), example(2.0)])
    response = prediction_stub.Regress(request, 10)
    assert [r.value for r in response.result.regressions] == [2.5, 3.0]
    assert response.model_spec.signature_name == "regress_x_to_y" and response.model_spec.version.value == 1

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "half"
    classify.model_spec.signature_name = "classify_x_to_y"
    classify.input.example_list.examples.append(example(4.0))
    result = prediction_stub.Classify(classify, 10).result
    assert result.classifications[0].classes[0].score == 4.0

    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                              ("classify_x_to_y", "tensorflow/serving/classify")):
        task = multi.tasks.add(method_name=method)
        task.model_spec.name = "half"
        task.model_spec.signature_name = signature
    multi.input.example_list.examples.append(example(6.0))
    results = prediction_stub.MultiInference(multi, 10).results
    assert results[0].regression_result.regressions[0].value == 5.0
    assert results[1].classification_result.classifications[0].classes[0].score == 5.0

    request.model_spec.signature_name = "nope"
    with pytest.raises(grpc.RpcError) as info:
        prediction_stub.Regress(request, 10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "No signature was found with the name: nope" in info.value.details()


def http(server, method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            # surrogateescape: a raw string output that is not UTF-8 arrives as its bytes, as from TF Serving.
            return response.status, response.headers["Content-Type"], response.read().decode("utf-8", "surrogateescape")
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_rest_predict_row_and_columnar(server):
    status, content_type, text = http(server, "POST", "/v1/models/half:predict", {"instances": [[1.0], [2.0], [5.0]]})
    assert (status, content_type) == (200, "application/json")
    assert json.loads(text) == {"predictions": [[2.5], [3.0], [4.5]]}
    status, _, text = http(server, "POST", "/v1/models/half/versions/1:predict", {"inputs": {"x": [[0.2]]}})
    assert status == 200 and json.loads(text) == {"outputs": [[2.1]]}
    assert "2.1" in text and "2.0999" not in text  # float32 shortest repr
    status, _, text = http(server, "POST", "/v1/models/digitgan/labels/stable:predict",
                           {"signature_name": "sample", "instances": [{"digit": 1, "seed": 5}, {"digit": 2, "seed": 6}]})
    assert status == 200, text
    rows = json.loads(text)["predictions"]
    assert len(rows) == 2 and set(rows[0]) == {"images", "png_bytes"}
    assert np.array(rows[0]["images"]).shape == (28, 28, 1)
    # TF Serving's rule: a string output is base64 exactly when its alias ends in _bytes
    assert set(rows[0]["png_bytes"]) == {"b64"}
    assert base64.b64decode(rows[0]["png_bytes"]["b64"]).startswith(b"\x89PNG")


def test_rest_regress_classify(server):
    status, _, text = http(server, "POST", "/v1/models/half:regress",
                           {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 3.0}]})
    assert status == 200 and json.loads(text) == {"results": [2.5, 3.5]}
    status, _, text = http(server, "POST", "/v1/models/half:classify",
                           {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert status == 200 and json.loads(text) == {"results": [[["", 3.0]]]}


def test_rest_status_and_metadata(server):
    status, _, text = http(server, "GET", "/v1/models/digitgan")
    assert status == 200
    assert json.loads(text) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status, _, text = http(server, "GET", "/v1/models/digitgan/versions/1/metadata")
    assert status == 200
    document = json.loads(text)
    assert document["model_spec"] == {"name": "digitgan", "signature_name": "", "version": "1"}
    signatures = document["metadata"]["signature_def"]["signature_def"]
    assert "__saved_model_init_op" in signatures
    assert signatures["serving_default"]["inputs"]["noise"]["dtype"] == "DT_FLOAT"


@pytest.mark.parametrize("method,path,body,code,message", [
    ("POST", "/v1/models/nope:predict", {"instances": [1]}, 404, "Servable not found for request: Latest(nope)"),
    ("POST", "/v1/models/half:predict", {"signature_name": "zz", "instances": [[1.0]]}, 400,
     'Serving signature name: "zz" not found in signature def'),
    ("POST", "/v1/models/half:predict", {"instances": [["a"]]}, 400, "is not of expected type: float"),
    ("POST", "/v1/models/half:predict", {"instances": [[1.0]], "inputs": [[1.0]]}, 400, "exactly one of"),
    ("POST", "/v1/models/half/labels/nope:predict", {"instances": [[1.0]]}, 400, "Unrecognized servable version label"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", "/v1/foo/bar", None, 400, "Malformed request: GET /v1/foo/bar"),
    ("POST", "/v1/models/digitgan:predict", {"signature_name": "sample", "instances": [{"digit": 12, "seed": 1}]},
     400, "digit must be in 0..9"),
])
def test_rest_errors(server, method, path, body, code, message):
    status, content_type, text = http(server, method, path, body)
    assert (status, content_type) == (code, "application/json")
    assert message in json.loads(text)["error"]


def test_rest_bad_json_and_too_deep_nesting_are_400(server):
    """Malformed JSON, and JSON nested past the parser's depth, are 400 (bodies over the size limit:
    test_rest_body_limit)."""
    status, _, text = http(server, "POST", "/v1/models/half:predict", raw=b"{not json")
    assert status == 400 and "error" in json.loads(text)
    deep = b"[" * 100000 + b"]" * 100000
    status, _, text = http(server, "POST", "/v1/models/half:predict", raw=b'{"instances": ' + deep + b"}")
    assert status == 400 and "nested too deeply" in json.loads(text)["error"], text


def test_prometheus_metrics(server, prediction_stub):
    http(server, "POST", "/v1/models/half:predict", {"instances": [[1.0]]})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0]], np.float32)))
    prediction_stub.Predict(request, 10)
    status, content_type, text = http(server, "GET", "/monitoring/prometheus/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert ':tensorflow:serving:request_count{model_name="half",status="OK"}' in text
    assert ':tensorflow:serving:request_latency_bucket{model_name="half",API="predict",entrypoint="REST",le=' in text
    assert ':tensorflow:serving:request_latency_count{model_name="half",API="Predict",entrypoint="GRPC"}' in text


def test_rest_body_limit(server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    connection.putrequest("POST", "/v1/models/half:predict")
    connection.putheader("Content-Length", str(server.config.max_message_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert "exceeds the limit" in json.loads(response.read())["error"]
    connection.close()
