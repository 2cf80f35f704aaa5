"""TF Serving's behaviour where a client could see a difference, over real gRPC and REST.

Each test names the tensorflow/serving source it follows: the start-up order (server.cc), version
labels (server_core.cc), deleted versions (file_system_storage_path_source.cc with
availability_preserving_policy.cc), method-name checks (classifier.cc, regressor.cc,
predict_util.cc), rapidjson's parse flags (json_tensor.cc), the gRPC edge cases
(get_model_status_impl.cc, get_model_metadata_impl.cc, saved_model::GetInputValues), and the
`serve` flags main.cc defines.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2
from typer.testing import CliRunner

import cli
import serving_test_models as models
from serving_test_models import Gate, wait_for
from serving import server as server_lib
from serving.config import FREE_PORT, ServeConfig
from serving.server import StartupError, create_server

ROOT = Path(__file__).resolve().parents[2]
STATE = get_model_status_pb2.ModelVersionStatus
LABEL_REFUSED = "Request to assign label to version {} of model {}, which is not currently available for inference"


# ---------------- helpers ----------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused(port: int) -> bool:
    """Whether a TCP connection to the port is refused (nothing listens)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def config_text(*models_: tuple[str, Path], labels: dict | None = None, platform: str = "tensorflow") -> str:
    config = model_server_config_pb2.ModelServerConfig()
    for name, base in models_:
        model = config.model_config_list.config.add(name=name, base_path=str(base))
        if platform:
            model.model_platform = platform
        for label, version in (labels or {}).get(name, {}).items():
            model.version_labels[label] = version
    return text_format.MessageToString(config)


def config_proto(*models_, **options) -> model_server_config_pb2.ModelServerConfig:
    return text_format.Parse(config_text(*models_, **options), model_server_config_pb2.ModelServerConfig())


def predict_request(model: str, signature: str = "", label: str = "", **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if label:
        request.model_spec.version_label = label
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def grpc_call(port: int, method: str, request, timeout: float = 30):
    """(response, None) or (None, (code, details)) of one RPC."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = (model_service_pb2_grpc.ModelServiceStub(channel)
                if method in ("GetModelStatus", "HandleReloadConfigRequest")
                else prediction_service_pb2_grpc.PredictionServiceStub(channel))
        try:
            return getattr(stub, method)(request, timeout), None
        except grpc.RpcError as error:
            return None, (error.code(), error.details())


def rest_call(port: int, method: str, path: str, body: bytes | None = None):
    """(HTTP status, raw body) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def statuses(port: int, model: str) -> dict[int, int]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response, error = grpc_call(port, "GetModelStatus", request)
    return {} if error else {status.version: status.state for status in response.model_version_status}


def copy_version(source: Path, base: Path, version: int) -> None:
    """Publish a version atomically, as `cli.py export` does."""
    staging = base.parent / f".staging-{base.name}-{version}"
    shutil.copytree(source, staging)
    base.mkdir(parents=True, exist_ok=True)
    os.rename(staging, base / str(version))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Built once: source versions to copy from (each a version folder)."""
    root = tmp_path_factory.mktemp("bundles")
    return {
        "generator": Path(models.build_generator(str(root / "generator" / "1"))),
        "half": Path(models.build_half_plus_two(str(root / "half" / "1"))),
        "strings": Path(models.build_strings(str(root / "strings" / "1"))),
        "rules": Path(models.build_signature_rules(str(root / "rules" / "1"))),
        "gate": Path(models.build_gate(str(root / "gate" / "1"))),
        "counter": Path(models.build_counter(str(root / "counter" / "1"), warmup_records=2)),
        "tagged": Path(models.build_counter(str(root / "tagged" / "1"), warmup_records=0, tags=("serve", "custom"))),
    }


@pytest.fixture
def start_server(tmp_path):
    """start_server(**ServeConfig settings) -> a started server; all are stopped after the test."""
    servers = []

    def start(**settings):
        settings = {"port": 0, "rest_port": FREE_PORT, "poll_seconds": 0.1, "grace_seconds": 1.0, **settings}
        server = create_server(ServeConfig(**settings))
        servers.append(server)
        assert server.start()
        return server

    yield start
    for server in servers:
        server.stop(0.5)


def base_with(bundles, tmp_path, name: str, version: int = 1) -> Path:
    base = tmp_path / name
    copy_version(bundles[name], base, version)
    return base


# ---------------- start-up order (server.cc BuildAndStart, main.cc) ----------------
def test_ports_open_only_once_the_models_are_loaded(bundles, tmp_path):
    """TF Serving loads the configured models (ServerCore::Create) before it opens any port: an
    early client gets a refused connection, not NOT_FOUND."""
    base = tmp_path / "digitgan"
    base.mkdir()
    grpc_port, rest_port = free_port(), free_port()
    server = create_server(ServeConfig(model_base_path=str(base), port=grpc_port, rest_port=rest_port,
                                       poll_seconds=0.1, grace_seconds=1.0))
    starting = threading.Thread(target=server.start)
    starting.start()
    try:
        # No version exists, so the server cannot have finished loading: both ports must be shut.
        assert refused(grpc_port) and refused(rest_port)
        assert server.grpc_port is None and server.rest_port is None
        copy_version(bundles["generator"], base, 1)
        starting.join(120)
        assert not starting.is_alive()
        assert statuses(grpc_port, "digitgan") == {1: STATE.AVAILABLE}
        assert rest_call(rest_port, "GET", "/v1/models/digitgan")[0] == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        starting.join(120)
        server.stop(0.5)


def test_a_model_whose_versions_all_fail_stops_the_start(tmp_path):
    """main.cc: "Failed to start server" when a model did not become available; nothing listens."""
    base = tmp_path / "digitgan"
    (base / "1").mkdir(parents=True)  # a version folder without a SavedModel
    port = free_port()
    server = create_server(ServeConfig(model_base_path=str(base), port=port, rest_port=0))
    with pytest.raises(StartupError) as failure:
        server.start()
    assert str(failure.value).startswith("1 servable(s) did not become available: "
                                         "{{name: digitgan version: 1} due to error: ")
    assert refused(port) and server.grpc_port is None


def test_serve_reports_a_failed_first_load_with_one_error_line_and_exit_2(tmp_path):
    base = tmp_path / "digitgan"
    (base / "1").mkdir(parents=True)
    result = CliRunner().invoke(cli.app, ["serve", "--model-base-path", str(base), "--port", "0", "--rest-port", "0"])
    assert result.exit_code == 2, result.output
    assert "error: 1 servable(s) did not become available: {{name: digitgan version: 1} due to error:" in result.output
    assert "listening" not in result.output and "Traceback" not in result.output


# ---------------- version labels (server_core.cc UpdateModelVersionLabelMap) ----------------
def test_labels_in_the_first_config_need_the_flag(bundles, tmp_path, start_server):
    """At start nothing is AVAILABLE yet, so TF refuses any label unless
    --allow_version_labels_for_unavailable_models."""
    base = base_with(bundles, tmp_path, "generator")
    config_file = tmp_path / "models.config"
    config_file.write_text(config_text(("digitgan", base), labels={"digitgan": {"stable": 1}}))
    with pytest.raises(StartupError, match="FAILED_PRECONDITION: " + LABEL_REFUSED.format(1, "digitgan")):
        create_server(ServeConfig(model_config_file=str(config_file), port=0, rest_port=0))
    result = CliRunner().invoke(cli.app, ["serve", "--model-config-file", str(config_file), "--port", "0",
                                          "--rest-port", "0"])
    assert result.exit_code == 2 and LABEL_REFUSED.format(1, "digitgan") in result.output

    server = start_server(model_config_file=str(config_file), allow_version_labels_for_unavailable_models=True)
    noise = np.zeros([1, models.LATENT_DIM], np.float32)
    response, error = grpc_call(server.grpc_port, "Predict", predict_request("digitgan", label="stable", noise=noise))
    assert error is None and response.model_spec.version.value == 1
    status, _body = rest_call(server.rest_port, "POST", "/v1/models/digitgan/labels/stable:predict",
                              json.dumps({"instances": noise.tolist()}).encode())
    assert status == 200


def test_a_refused_reload_leaves_models_and_labels_as_they_were(bundles, tmp_path, start_server):
    base = base_with(bundles, tmp_path, "generator")
    copy_version(bundles["generator"], base, 2)
    half = base_with(bundles, tmp_path, "half")
    config_file = tmp_path / "models.config"
    config_file.write_text(config_text(("digitgan", base), labels={"digitgan": {"stable": 1}}))
    server = start_server(model_config_file=str(config_file), allow_version_labels_for_unavailable_models=True)
    # latest{1}: version 2 serves, 1 was unloaded. The flag allows a *new* label on an unavailable
    # version, but moving "stable" from 1 to an unavailable version is still refused, and so is the
    # whole config, its new model "half" included.
    reload = model_management_pb2.ReloadConfigRequest(config=config_proto(
        ("digitgan", base), ("half", half), labels={"digitgan": {"stable": 7, "canary": 2}}))
    _response, error = grpc_call(server.grpc_port, "HandleReloadConfigRequest", reload)
    assert error == (grpc.StatusCode.FAILED_PRECONDITION, LABEL_REFUSED.format(7, "digitgan"))
    _response, error = grpc_call(server.grpc_port, "Predict", predict_request("digitgan", label="canary",
                                                                              noise=np.zeros([1, 100], np.float32)))
    assert error == (grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: canary")
    assert statuses(server.grpc_port, "half") == {}  # not added
    _response, error = grpc_call(server.grpc_port, "Predict", predict_request("digitgan", label="stable",
                                                                              noise=np.zeros([1, 100], np.float32)))
    assert error == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(digitgan, 1)")
    # Pointing a label at the AVAILABLE version 2 is accepted, with the new model.
    reload = model_management_pb2.ReloadConfigRequest(config=config_proto(
        ("digitgan", base), ("half", half), labels={"digitgan": {"stable": 2}}))
    response, error = grpc_call(server.grpc_port, "HandleReloadConfigRequest", reload, timeout=120)
    assert error is None and response.status.error_code == 0
    response, error = grpc_call(server.grpc_port, "Predict", predict_request("digitgan", label="stable",
                                                                             noise=np.zeros([1, 100], np.float32)))
    assert error is None and response.model_spec.version.value == 2
    assert statuses(server.grpc_port, "half") == {1: STATE.AVAILABLE}


# ---------------- deleted versions (file_system_storage_path_source.cc) ----------------
def test_deleting_every_version_unloads_the_model_and_a_missing_base_path_changes_nothing(
        bundles, tmp_path, start_server):
    """An empty base path: the source aspires no version and the manager unloads them all. A base
    path that is gone: the poll fails for it and nothing changes (it keeps serving)."""
    kept = base_with(bundles, tmp_path, "half")
    emptied = tmp_path / "digitgan"
    copy_version(bundles["generator"], emptied, 1)
    config_file = tmp_path / "models.config"
    config_file.write_text(config_text(("kept", kept), ("emptied", emptied)))  # polled in this order
    server = start_server(model_config_file=str(config_file))
    os.rename(kept, tmp_path / "kept-moved-away")
    os.rename(emptied / "1", tmp_path / "deleted-version")
    # One poll visits "kept", then "emptied": once "emptied" is unloaded, "kept" has been polled too.
    assert wait_for(lambda: statuses(server.grpc_port, "emptied") == {1: STATE.END})
    _response, error = grpc_call(server.grpc_port, "Predict", predict_request(
        "emptied", noise=np.zeros([1, models.LATENT_DIM], np.float32)))
    assert error == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(emptied)")
    assert statuses(server.grpc_port, "kept") == {1: STATE.AVAILABLE}
    response, error = grpc_call(server.grpc_port, "Predict", predict_request("kept", x=np.array([2.0], np.float32)))
    assert error is None and tf.make_ndarray(response.outputs["y"]).tolist() == [3.0]
    copy_version(bundles["generator"], emptied, 2)  # a new version is served again
    assert wait_for(lambda: statuses(server.grpc_port, "emptied").get(2) == STATE.AVAILABLE)


# ---------------- method names (classifier.cc, regressor.cc, predict_util.cc) ----------------
def classify_request(signature: str) -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "rules"
    request.model_spec.signature_name = signature
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.append(4.0)
    return request


def regress_request(signature: str) -> regression_pb2.RegressionRequest:
    request = regression_pb2.RegressionRequest()
    request.model_spec.CopyFrom(classify_request(signature).model_spec)
    request.input.CopyFrom(classify_request(signature).input)
    return request


@pytest.mark.parametrize("check", [False, True])
def test_method_names_are_checked_only_with_the_flag(bundles, tmp_path, start_server, check):
    base = base_with(bundles, tmp_path, "rules")
    server = start_server(model_base_path=str(base), model_name="rules", enable_signature_method_name_check=check)
    classified, classify_error = grpc_call(server.grpc_port, "Classify", classify_request("classify_as_predict"))
    regressed, regress_error = grpc_call(server.grpc_port, "Regress", regress_request("regress_as_predict"))
    rest_status, rest_body = rest_call(server.rest_port, "POST", "/v1/models/rules:classify", json.dumps(
        {"signature_name": "classify_as_predict", "examples": [{"x": 4.0}]}).encode())
    predicted, predict_error = grpc_call(server.grpc_port, "Predict", predict_request(
        "rules", "custom_method", x=np.array([1.0], np.float32)))
    if not check:  # TF's default: the signatures' inputs and outputs are what counts
        assert classify_error is None and classified.result.classifications[0].classes[0].score == 4.0
        assert regress_error is None and regressed.result.regressions[0].value == 4.0
        assert (rest_status, json.loads(rest_body)) == (200, {"results": [[["", 4.0]]]})
        assert predict_error is None and tf.make_ndarray(predicted.outputs["y"]).tolist() == [1.0]
        return
    assert classify_error == (grpc.StatusCode.INVALID_ARGUMENT, "Expected classification signature method_name to be "
                              "tensorflow/serving/classify. Was: tensorflow/serving/predict")
    assert regress_error == (grpc.StatusCode.INVALID_ARGUMENT, "Expected regression signature method_name to be "
                             "tensorflow/serving/regress. Was: tensorflow/serving/predict")
    assert rest_status == 400 and "method_name" in json.loads(rest_body)["error"]
    assert predict_error == (grpc.StatusCode.INTERNAL, "Expected prediction signature method_name to be one of "
                             "{tensorflow/serving/predict, tensorflow/serving/classify, tensorflow/serving/regress}. "
                             "Was: custom/method")


# ---------------- gRPC edge cases ----------------
@pytest.fixture(scope="module")
def rules_server(bundles, tmp_path_factory):
    """One server of the rules, half and strings models (no labels, no flags)."""
    root = tmp_path_factory.mktemp("served")
    entries = []
    for name in ("rules", "half", "strings"):
        copy_version(bundles[name], root / name, 1)
        entries.append((name, root / name))
    config_file = root / "models.config"
    config_file.write_text(config_text(*entries))
    server = create_server(ServeConfig(model_config_file=str(config_file), port=0, rest_port=FREE_PORT,
                                       grace_seconds=1.0))
    assert server.start()
    yield server
    server.stop(0.5)


def test_get_model_status_with_an_empty_name_is_not_found(rules_server):
    """get_model_status_impl.cc looks the empty name up like any other."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = ""
    _response, error = grpc_call(rules_server.grpc_port, "GetModelStatus", request)
    assert error == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model ")


def test_get_model_metadata_checks_its_fields_before_the_model(rules_server):
    """ValidateGetModelMetadataRequest runs before GetServableHandle: INVALID_ARGUMENT, not NOT_FOUND."""
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "no_such_model"
    _response, error = grpc_call(rules_server.grpc_port, "GetModelMetadata", request)
    assert error == (grpc.StatusCode.INVALID_ARGUMENT,
                     "GetModelMetadataRequest must specify at least one metadata_field")
    request.metadata_field.append("graph_def")
    _response, error = grpc_call(rules_server.grpc_port, "GetModelMetadata", request)
    assert error == (grpc.StatusCode.INVALID_ARGUMENT, "Metadata field graph_def is not supported")
    request.metadata_field[:] = ["signature_def"]
    _response, error = grpc_call(rules_server.grpc_port, "GetModelMetadata", request)
    assert error == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(no_such_model)")


def test_signature_defaults_fill_inputs_a_request_leaves_out(rules_server):
    """saved_model::GetInputValues takes SignatureDef.defaults for inputs the request omits."""
    port = rules_server.grpc_port
    x = np.array([1.0, 2.0], np.float32)
    response, error = grpc_call(port, "Predict", predict_request("rules", "with_default", x=x))
    assert error is None and tf.make_ndarray(response.outputs["y"]).tolist() == [11.0, 12.0]
    response, error = grpc_call(port, "Predict", predict_request("rules", "with_default", x=x, bias=x))
    assert error is None and tf.make_ndarray(response.outputs["y"]).tolist() == [2.0, 4.0]
    _response, error = grpc_call(port, "Predict", predict_request("rules", "with_default", bias=x))
    assert error == (grpc.StatusCode.INVALID_ARGUMENT, "Signature input alias: x(feed name: x:0) not found in request "
                     "and no default value provided. Inputs expected to be in the request {bias}, or default input "
                     "alias set: bias")
    _response, error = grpc_call(port, "Predict", predict_request("rules", "with_default", x=x, other=x))
    assert error == (grpc.StatusCode.INVALID_ARGUMENT,
                     "Inputs contains invalid name. Used request inputs: x, request input: other,x")


def test_model_platform_is_required(bundles, tmp_path, rules_server):
    """server_core.cc GetPlatform: a config without model_platform (or model_type) is INVALID_ARGUMENT,
    at start and on reload."""
    message = ("Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
               "ModelServerConfig::model_platform, model name is half")
    reload = model_management_pb2.ReloadConfigRequest(config=config_proto(("half", tmp_path / "half"), platform=""))
    _response, error = grpc_call(rules_server.grpc_port, "HandleReloadConfigRequest", reload)
    assert error == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert statuses(rules_server.grpc_port, "rules") == {1: STATE.AVAILABLE}  # the config in force stays
    config_file = tmp_path / "models.config"
    config_file.write_text(config_text(("half", base_with(bundles, tmp_path, "half")), platform=""))
    result = CliRunner().invoke(cli.app, ["serve", "--model-config-file", str(config_file), "--port", "0",
                                          "--rest-port", "0"])
    assert result.exit_code == 2 and f"error: INVALID_ARGUMENT: {message}" in result.output
    config_file.write_text(config_text(("half", tmp_path / "half"), platform="pytorch"))
    with pytest.raises(StartupError, match="Model half requests unsupported platform pytorch"):
        create_server(ServeConfig(model_config_file=str(config_file), port=0, rest_port=0))


# ---------------- JSON as rapidjson parses it (json_tensor.cc ParseJson) ----------------
def rest_json(server, path: str, body: bytes):
    """(status, parsed reply); a raw string output may hold bytes that are not UTF-8, as in TF."""
    status, raw = rest_call(server.rest_port, "POST", path, body)
    return status, json.loads(raw.decode("utf-8", "surrogateescape"))


def test_rest_json_text_after_the_object_is_not_read(rules_server):
    """kParseStopWhenDoneFlag: parsing ends with the first value."""
    assert rest_json(rules_server, "/v1/models/half:predict", b'{"instances": [1.0]} and then {not json') == \
        (200, {"predictions": [2.5]})


def test_rest_json_nan_and_infinity_in_every_spelling(rules_server):
    """kParseNanAndInfFlag: NaN, Inf and Infinity, each with or without a minus sign."""
    body = b'{"signature_name": "floats", "instances": [NaN, -NaN, Inf, -Inf, Infinity, -Infinity, 1.5]}'
    status, document = rest_json(rules_server, "/v1/models/strings:predict", body)
    assert status == 200
    values = [row["y"] for row in document["predictions"]]
    assert math.isnan(values[0]) and math.isnan(values[1])
    assert values[2:] == [math.inf, -math.inf, math.inf, -math.inf, 1.5]


def test_rest_json_numbers_too_big_for_a_double_are_refused(rules_server):
    for number in (b"1e400", b"-1e400", b"1" * 400):
        status, document = rest_json(rules_server, "/v1/models/half:predict", b'{"instances": [' + number + b"]}")
        assert status == 400
        assert document["error"] == "JSON Parse error: Number too big to be stored in double. at offset: 15"
    # An integer past uint64 is still a number: a double, as rapidjson keeps it.
    status, document = rest_json(rules_server, "/v1/models/half:predict", b'{"instances": [18446744073709551616]}')
    assert status == 200 and document["predictions"][0] == pytest.approx(0.5 * 2**64 + 2, rel=1e-6)


def test_rest_json_strings_keep_their_bytes_even_when_not_utf8(rules_server):
    """rapidjson reads without kParseValidateEncodingFlag: a string's bytes reach the model as sent."""
    raw = b"\xff\xfe not UTF-8 \xc3"
    status, document = rest_json(rules_server, "/v1/models/strings:predict", b'{"instances": ["' + raw + b'"]}')
    assert status == 200 and base64.b64decode(document["predictions"][0]["text_bytes"]["b64"]) == raw
    assert document["predictions"][0]["text"].encode("utf-8", "surrogateescape") == raw
    status, document = rest_json(rules_server, "/v1/models/strings:predict", b'{"instances": ["\\ud800"]}')
    assert status == 400 and "surrogate" in document["error"]


def test_rest_json_repeated_names(rules_server):
    """rapidjson keeps every member: FindMember takes the first ("instances", "inputs", a named
    input); a tf.Example's features map takes the last; an instance naming an input twice is refused."""
    half = "/v1/models/half:predict"
    assert rest_json(rules_server, half, b'{"instances": [1.0], "instances": [3.0]}') == (200, {"predictions": [2.5]})
    assert rest_json(rules_server, half, b'{"inputs": {"x": [1.0], "x": [3.0]}}') == (200, {"outputs": [2.5]})
    body = b'{"signature_name": "regress_x_to_y", "examples": [{"x": 1.0, "x": 3.0}]}'
    assert rest_json(rules_server, "/v1/models/half:regress", body) == (200, {"results": [3.5]})
    body = b'{"signature_name": "with_default", "instances": [{"x": 1.0, "bias": 1.0, "x": 2.0}]}'
    status, document = rest_json(rules_server, "/v1/models/rules:predict", body)
    assert status == 400 and "names an input more than once" in document["error"]


def test_rest_json_a_uint64_feature_is_a_400(rules_server):
    body = b'{"signature_name": "regress_x_to_y", "examples": [{"x": 18446744073709551615}]}'
    assert rest_json(rules_server, "/v1/models/half:regress", body) == \
        (400, {"error": "Feature: x has uint64_t element. Only int64_t is supported."})


# ---------------- flags (main.cc) ----------------
def test_model_config_file_is_polled_when_asked(bundles, tmp_path, start_server, caplog):
    """--model_config_file_poll_wait_seconds: a changed file is applied; a refused one is logged
    and the config in force stays."""
    digitgan = base_with(bundles, tmp_path, "generator")
    half = base_with(bundles, tmp_path, "half")
    config_file = tmp_path / "models.config"
    config_file.write_text(config_text(("digitgan", digitgan)))
    server = start_server(model_config_file=str(config_file), model_config_file_poll_wait_seconds=0.1)
    config_file.write_text(config_text(("digitgan", digitgan), labels={"digitgan": {"stable": 5}}))
    assert wait_for(lambda: any("PollFilesystemAndReloadConfig failed to ReloadConfig" in record.getMessage()
                                for record in caplog.records))
    config_file.write_text(config_text(("half", half)))
    assert wait_for(lambda: statuses(server.grpc_port, "half") == {1: STATE.AVAILABLE})
    assert wait_for(lambda: statuses(server.grpc_port, "digitgan") == {})  # dropped with the config
    response, error = grpc_call(server.grpc_port, "Predict", predict_request("half", x=np.array([2.0], np.float32)))
    assert error is None and tf.make_ndarray(response.outputs["y"]).tolist() == [3.0]
    # The file wins on every poll, over a config HandleReloadConfigRequest put in force since.
    reload = model_management_pb2.ReloadConfigRequest(config=config_proto(("digitgan", digitgan)))
    _response, error = grpc_call(server.grpc_port, "HandleReloadConfigRequest", reload, timeout=120)
    assert error is None
    assert wait_for(lambda: statuses(server.grpc_port, "digitgan") == {}
                    and statuses(server.grpc_port, "half").get(1) == STATE.AVAILABLE)


def test_a_rest_request_past_the_timeout_gets_504(bundles, tmp_path, start_server):
    """--rest_api_timeout_in_ms becomes RunOptions.timeout_in_ms: the run is cut off, DEADLINE_EXCEEDED."""
    server = start_server(model_base_path=str(base_with(bundles, tmp_path, "gate")), model_name="gate",
                          rest_api_timeout_in_ms=200)
    status, raw = rest_call(server.rest_port, "POST", "/v1/models/gate:predict", b'{"instances": [1.0]}')
    assert status == 504 and json.loads(raw) == {"error": "Timed out waiting for notification"}
    Gate(server).release(1)  # the gate itself still works: a request with a token passes
    status, raw = rest_call(server.rest_port, "POST", "/v1/models/gate:predict", b'{"instances": [1.0]}')
    assert status == 200 and json.loads(raw) == {"predictions": [1.0]}


def test_rest_requests_past_the_threads_wait_for_one(bundles, tmp_path, start_server):
    """--rest_api_num_threads: requests beyond the pool wait (TF's executor queue), not refused."""
    server = start_server(model_base_path=str(base_with(bundles, tmp_path, "gate")), model_name="gate",
                          rest_api_num_threads=1)
    gate, results = Gate(server), []

    def send():
        results.append(rest_call(server.rest_port, "POST", "/v1/models/gate:predict", b'{"instances": [1.0]}'))

    senders = [threading.Thread(target=send) for _ in range(2)]
    for sender in senders:
        sender.start()
    assert wait_for(lambda: gate.arrivals() == 1 and server._rest_server.workers.waiting() == 1)
    assert gate.arrivals() == 1  # the second request waits for the one thread, outside the model
    gate.release(2)
    for sender in senders:
        sender.join(60)
    assert [status for status, _body in results] == [200, 200] and gate.arrivals() == 2


@pytest.mark.parametrize("settings, runs", [({}, 2), ({"num_request_iterations_for_warmup": 3}, 6),
                                            ({"enable_model_warmup": False}, 0)])
def test_warmup_flags(bundles, tmp_path, start_server, settings, runs):
    """--enable_model_warmup and --num_request_iterations_for_warmup: each of the 2 warmup records
    runs once, 3 times, or not at all before the version serves; the model counts its runs."""
    server = start_server(model_base_path=str(base_with(bundles, tmp_path, "counter")), model_name="counter",
                          **settings)
    response, error = grpc_call(server.grpc_port, "Predict", predict_request("counter", "count"))
    assert error is None and tf.make_ndarray(response.outputs["count"]) == runs


def test_saved_model_tags(bundles, tmp_path, start_server):
    """--saved_model_tags picks the MetaGraph; the default "serve" finds none in a serve,custom model."""
    base = base_with(bundles, tmp_path, "tagged")
    with pytest.raises(StartupError, match="did not become available"):
        create_server(ServeConfig(model_base_path=str(base), model_name="tagged", port=0, rest_port=0)).start()
    server = start_server(model_base_path=str(base), model_name="tagged", saved_model_tags="serve,custom")
    response, error = grpc_call(server.grpc_port, "Predict", predict_request("tagged", x=np.array([4.0], np.float32)))
    assert error is None and tf.make_ndarray(response.outputs["y"]).tolist() == [4.0]


@pytest.mark.slow  # a fresh Python, so TensorFlow's runtime starts with the server's settings
def test_tensorflow_thread_flags_set_the_runtime_before_it_starts(bundles, tmp_path):
    base = base_with(bundles, tmp_path, "half")
    script = (
        "import sys, tensorflow as tf\n"
        "from tensorflow_serving.apis import model_pb2\n"
        "from serving.config import ServeConfig\n"
        "from serving.server import create_server\n"
        f"server = create_server(ServeConfig(model_base_path={str(base)!r}, model_name='half', port=0, rest_port=0,\n"
        "    tensorflow_intra_op_parallelism=1, tensorflow_inter_op_parallelism=2))\n"
        "server.start()\n"
        "loaded = server.manager.acquire(model_pb2.ModelSpec(name='half'))\n"
        "config = loaded.session._config\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads(),\n"
        "      config.intra_op_parallelism_threads, config.inter_op_parallelism_threads)\n"
        "loaded.release()\n"
        "server.stop(0.1)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "2", "1", "2"]


def test_version_prints_this_servers_version_and_tensorflows():
    result = CliRunner().invoke(cli.app, ["serve", "--version"])
    assert result.exit_code == 0
    assert result.output.splitlines() == ["digitgan ModelServer: 0.1.0", f"TensorFlow Library: {tf.__version__}"]


def test_engine_tfserving_passes_each_flag_under_tfs_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    config = ServeConfig(engine="tfserving", model_config_file="models.config",
                         allow_version_labels_for_unavailable_models=True, enable_signature_method_name_check=True,
                         model_config_file_poll_wait_seconds=30, rest_api_timeout_in_ms=5000,
                         enable_model_warmup=False, num_request_iterations_for_warmup=3, saved_model_tags="serve,gpu",
                         rest_api_num_threads=16, tensorflow_intra_op_parallelism=2, tensorflow_inter_op_parallelism=4)
    assert server_lib.tfserving_command(config)[5:] == [
        "--allow_version_labels_for_unavailable_models=true", "--enable_signature_method_name_check=true",
        "--model_config_file_poll_wait_seconds=30", "--rest_api_timeout_in_ms=5000", "--enable_model_warmup=false",
        "--num_request_iterations_for_warmup=3", "--saved_model_tags=serve,gpu", "--rest_api_num_threads=16",
        "--tensorflow_intra_op_parallelism=2", "--tensorflow_inter_op_parallelism=4"]
    # TF's defaults are not spelt out.
    assert server_lib.tf_serving_flags(ServeConfig(engine="tfserving")) == []


@pytest.mark.slow  # `cli.py serve` in a subprocess, exec'ing a stand-in tensorflow_model_server
def test_cli_engine_tfserving_execs_the_binary_with_tfs_flags(tmp_path):
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text('#!/bin/sh\nfor argument in "$@"; do echo "$argument"; done\n')
    binary.chmod(0o755)
    environment = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    run = [sys.executable, "cli.py", "serve", "--engine", "tfserving"]
    version = subprocess.run(run + ["--version"], cwd=ROOT, env=environment, capture_output=True, text=True,
                             timeout=300)
    assert version.returncode == 0 and version.stdout.splitlines() == ["--version"]
    served = subprocess.run(run + ["--model-base-path", str(tmp_path), "--rest-api-timeout-in-ms", "700",
                                   "--no-enable-model-warmup", "--saved-model-tags", "serve,gpu",
                                   "--model-config-file-poll-wait-seconds", "0", "--rest-api-num-threads", "3",
                                   "--tensorflow-intra-op-parallelism", "1", "--allow-version-labels-for-unavailable-models"],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    arguments = served.stdout.splitlines()
    for flag in ("--rest_api_timeout_in_ms=700", "--enable_model_warmup=false", "--saved_model_tags=serve,gpu",
                 "--rest_api_num_threads=3", "--tensorflow_intra_op_parallelism=1",
                 "--allow_version_labels_for_unavailable_models=true"):
        assert flag in arguments, arguments
