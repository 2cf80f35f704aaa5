"""Shared fixtures: test SavedModels built once, and one running server on port 0."""

from __future__ import annotations

import os

import grpc
import pytest
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.config import FREE_PORT, ServeConfig
from serving.server import create_server
import serving_test_models as model_builders


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model_builders.build_generator(str(root / "digitgan" / "1"))
    model_builders.build_half_plus_two(str(root / "half" / "1"))
    os.makedirs(root / "digitgan" / "not_a_version")  # must be ignored
    return root


@pytest.fixture(scope="session")
def server(model_root, tmp_path_factory):
    config_file = tmp_path_factory.mktemp("config") / "models.config"
    config_file.write_text(f"""
model_config_list {{
  config {{ name: "digitgan" base_path: "{model_root / 'digitgan'}" model_platform: "tensorflow"
           version_labels {{ key: "stable" value: 1 }} }}
  config {{ name: "half" base_path: "{model_root / 'half'}" model_platform: "tensorflow" }}
}}
""")
    monitoring_file = config_file.parent / "monitoring.config"
    monitoring_file.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n')
    config = ServeConfig(model_config_file=str(config_file), port=0, rest_port=FREE_PORT, poll_seconds=1.0,
                         max_request_elements=1_000_000, grace_seconds=1.0,
                         monitoring_config_file=str(monitoring_file),
                         allow_version_labels_for_unavailable_models=True)  # the label is in the first config
    model_server = create_server(config)
    model_server.start()
    assert model_server.wait_until_ready(60)
    yield model_server
    model_server.stop(1.0)


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as grpc_channel:
        yield grpc_channel


@pytest.fixture(scope="session")
def prediction_stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="session")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)
