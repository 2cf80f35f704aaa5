"""The deployment files in serving/deploy/ are valid and work with the project's own server.

Nothing here needs Docker, a cluster or the network: the YAML files are parsed and checked for
the kinds, ports, mounts and probe paths that matter; the TF Serving text configs are parsed the
way tensorflow_model_server parses them; and the project's server is started from the same
models.config and batching.config (base_path pointed at a tiny test bundle) and answers Predict
over gRPC, and the compose healthcheck command itself, run with bash, passes against its REST port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml  # pyyaml is in the test extras: a missing one fails here, it does not skip the YAML checks
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import batching
from serving.config import FREE_PORT, ServeConfig
from serving.server import batching_parameters_text, create_server
import serving_test_models as model_builders

DEPLOY = Path(__file__).resolve().parents[2] / "serving" / "deploy"
BATCHING_FIELDS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
IMAGE_PATTERN = re.compile(r"^tensorflow/serving:(\$\{TF_SERVING_TAG:-)?2\.\d+\.\d+\}?$")


# ---------------- TF Serving text configs ----------------
def parse_model_config(text: str) -> model_server_config_pb2.ModelServerConfig:
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def parse_batching_parameters(text: str) -> dict[str, int]:
    """The knobs of a BatchingParameters text proto, parsed as tensorflow.serving.BatchingParameters."""
    message = text_format.Parse(text, batching.batching_parameters_class()())
    values = {name: getattr(message, name).value for name in BATCHING_FIELDS if message.HasField(name)}
    assert set(values) == set(BATCHING_FIELDS), f"missing fields: {set(BATCHING_FIELDS) - set(values)}"
    return values


def commented_example(text: str) -> str:
    """The commented-out `specific` + labels ModelServerConfig at the end of models.config."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# model_config_list {"))
    return "\n".join(line[2:] for line in lines[start:] if line.startswith("# "))


def test_models_config_parses_as_model_server_config():
    config = parse_model_config((DEPLOY / "models.config").read_text())
    (model,) = config.model_config_list.config
    assert model.name == "digitgan"
    assert model.base_path == "/models/digitgan"
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions == 1
    assert not model.version_labels


def test_models_config_commented_example_is_valid_specific_with_labels():
    config = parse_model_config(commented_example((DEPLOY / "models.config").read_text()))
    (model,) = config.model_config_list.config
    assert model.name == "digitgan" and model.base_path == "/models/digitgan"
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


def test_batching_config_parses_and_is_accepted_by_the_project_server_config():
    values = parse_batching_parameters((DEPLOY / "batching.config").read_text())
    assert 1 <= values["max_batch_size"] <= 1024
    assert 0 <= values["batch_timeout_micros"] <= 100_000
    assert values["max_enqueued_batches"] >= 1 and values["num_batch_threads"] >= 1
    config = ServeConfig(enable_batching=True, **values)
    # The project writes the same format for engine=tfserving; it must read back to the same values.
    assert parse_batching_parameters(batching_parameters_text(config)) == values


def test_monitoring_config_enables_prometheus_on_the_default_path():
    text = (DEPLOY / "monitoring.config").read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert re.search(r"prometheus_config\s*\{[^}]*enable:\s*true", body)
    assert re.search(r'path:\s*"/monitoring/prometheus/metrics"', body)


# ---------------- compose.yaml / kubernetes.yaml ----------------
def load_yaml_documents(name: str) -> list:
    with open(DEPLOY / name, encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document is not None]


def flags(arguments: list[str]) -> dict[str, str]:
    parsed = {}
    for argument in arguments:
        assert argument.startswith("--") and "=" in argument, f"flag not in --name=value form: {argument!r}"
        name, value = argument[2:].split("=", 1)
        parsed[name] = value
    return parsed


def check_server_flags(parsed: dict[str, str]) -> None:
    assert parsed["port"] == "8500" and parsed["rest_api_port"] == "8501"
    assert parsed["model_config_file"] == "/config/models.config"
    assert parsed["enable_batching"] == "true"
    assert parsed["batching_parameters_file"] == "/config/batching.config"
    assert parsed["monitoring_config_file"] == "/config/monitoring.config"
    assert int(parsed["file_system_poll_wait_seconds"]) >= 1


def test_compose_file_runs_tf_serving_with_the_deploy_configs():
    (compose,) = load_yaml_documents("compose.yaml")
    (service,) = compose["services"].values()
    assert IMAGE_PATTERN.match(service["image"]), service["image"]
    assert service["entrypoint"] == ["tensorflow_model_server"]
    check_server_flags(flags(service["command"]))
    assert set(service["ports"]) == {"8500:8500", "8501:8501"}
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert mounts["/models"] == "../../models"
    for name in ("models.config", "batching.config", "monitoring.config"):
        assert mounts[f"/config/{name}"] == f"./{name}"
        assert (DEPLOY / name).is_file()
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and "/v1/models/digitgan" in " ".join(test)
    assert test == compose_healthcheck_command(), "the healthcheck line must stay one JSON-style list"


def test_kubernetes_manifests_deployment_service_and_autoscaler():
    documents = load_yaml_documents("kubernetes.yaml")
    by_kind = {document["kind"]: document for document in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= set(by_kind)

    deployment = by_kind["Deployment"]
    assert deployment["apiVersion"] == "apps/v1" and deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert IMAGE_PATTERN.match(container["image"]), container["image"]
    check_server_flags(flags(container["args"]))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}
    # Ready (and started) only once a version is AVAILABLE: the status URL answers 200 while it is
    # LOADING, so these probes read the state; they run the compose healthcheck's own command.
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["exec"]["command"] == ["bash", "-c", compose_healthcheck_command()[3]]
        assert container[probe]["timeoutSeconds"] > 5  # the command's own `timeout 5` ends first
    assert container["livenessProbe"]["httpGet"]["path"] == "/monitoring/prometheus/metrics"
    assert container["livenessProbe"]["httpGet"]["port"] in ("http", 8501)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/models"]]
    assert volumes[mounts["/config"]]["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]

    service = by_kind["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {port["port"] for port in service["spec"]["ports"]} == {8500, 8501}

    autoscaler = by_kind["HorizontalPodAutoscaler"]
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert autoscaler["spec"]["minReplicas"] >= 2
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_kubernetes_config_map_matches_the_deploy_config_files():
    config_map = next(d for d in load_yaml_documents("kubernetes.yaml") if d["kind"] == "ConfigMap")
    data = config_map["data"]
    assert parse_model_config(data["models.config"]) == parse_model_config((DEPLOY / "models.config").read_text())
    assert parse_batching_parameters(data["batching.config"]) == \
        parse_batching_parameters((DEPLOY / "batching.config").read_text())
    assert data["monitoring.config"].split() == [
        word for line in (DEPLOY / "monitoring.config").read_text().splitlines()
        for word in line.split("#", 1)[0].split()]


# ---------------- the project's server on the same configs ----------------
def compose_healthcheck_command() -> list[str]:
    """The compose healthcheck `test:` list, read without PyYAML (it is kept JSON-compatible)."""
    text = (DEPLOY / "compose.yaml").read_text()
    match = re.search(r"^\s*test:\s*(\[.*\])\s*$", text, re.M)
    assert match, "compose.yaml has no one-line healthcheck test list"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def deploy_server(model_root, tmp_path_factory):
    """The project's server started from serving/deploy's models.config and batching.config."""
    config = parse_model_config((DEPLOY / "models.config").read_text())
    config.model_config_list.config[0].base_path = str(model_root / "digitgan")
    config_file = tmp_path_factory.mktemp("deploy") / "models.config"
    config_file.write_text(text_format.MessageToString(config))
    with model_builders.running_server(model_config_file=str(config_file), port=0, rest_port=FREE_PORT,
                                       enable_batching=True, batching_parameters_file=str(DEPLOY / "batching.config"),
                                       grace_seconds=1.0) as server:
        yield server


def test_project_server_loads_deploy_models_config_and_answers_predict(deploy_server):
    noise = np.random.default_rng(0).standard_normal((3, model_builders.LATENT_DIM)).astype(np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digitgan"
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(noise))
    with grpc.insecure_channel(f"127.0.0.1:{deploy_server.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert response.model_spec.name == "digitgan" and response.model_spec.version.value == 1
    images = tf.make_ndarray(response.outputs["images"])
    np.testing.assert_allclose(images, model_builders.expected_images(noise), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # runs the healthcheck command in bash subprocesses
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout, as in the tensorflow/serving image")
def test_compose_healthcheck_command_passes_against_a_serving_rest_port(deploy_server):
    command = compose_healthcheck_command()
    assert command[:3] == ["CMD", "bash", "-c"]
    script = command[3]
    assert "/dev/tcp/127.0.0.1/8501" in script
    healthy = subprocess.run(["bash", "-c", script.replace("/8501", f"/{deploy_server.rest_port}")],
                             capture_output=True, timeout=30)
    assert healthy.returncode == 0, healthy.stderr
    unknown = subprocess.run(["bash", "-c", script.replace("/8501", f"/{deploy_server.rest_port}")
                              .replace("/v1/models/digitgan", "/v1/models/nosuchmodel")],
                             capture_output=True, timeout=30)
    assert unknown.returncode != 0


def run_healthcheck(rest_port: int, model_name: str = "digitgan") -> int:
    """Exit code of the compose healthcheck (= the Kubernetes readiness command) against a REST port."""
    script = compose_healthcheck_command()[3].replace("/8501", f"/{rest_port}")
    script = script.replace("/v1/models/digitgan", f"/v1/models/{model_name}")
    return subprocess.run(["bash", "-c", script], capture_output=True, timeout=30).returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # runs the readiness command in bash subprocesses
def test_readiness_command_fails_until_a_version_is_available(model_root, tmp_path):
    """No version yet: nothing listens (as tensorflow_model_server, the ports open once a version
    is AVAILABLE), so the command fails; once one is, it passes."""
    base = tmp_path / "digitgan"
    base.mkdir()
    rest_port = free_port()
    server = create_server(ServeConfig(model_base_path=str(base), port=0, rest_port=rest_port, poll_seconds=0.1,
                                       grace_seconds=1.0))
    starting = threading.Thread(target=server.start)
    starting.start()
    try:
        assert run_healthcheck(rest_port) != 0  # connection refused: the server is still waiting for a version
        shutil.copytree(model_root / "digitgan" / "1", tmp_path / "staging")
        os.rename(tmp_path / "staging", base / "3")
        starting.join(120)
        assert not starting.is_alive() and server.rest_port == rest_port
        assert run_healthcheck(rest_port) == 0
    finally:
        starting.join(120)
        server.stop(1.0)
