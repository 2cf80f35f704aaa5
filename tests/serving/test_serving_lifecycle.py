"""Hot swap, broken versions, config reload, health, batching and the client library."""

import logging
import os
import shutil
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

import cli
import serving_test_models as models
from serving_test_models import wait_for
from client import grpc_client
from serving.config import ServeConfig
from serving.server import create_server

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


@pytest.fixture(scope="module")
def generator_v1(tmp_path_factory):
    return models.build_generator(str(tmp_path_factory.mktemp("gen") / "v1"), scale=1.0)


@pytest.fixture(scope="module")
def generator_v2(tmp_path_factory):
    return models.build_generator(str(tmp_path_factory.mktemp("gen") / "v2"), scale=2.0)


@pytest.fixture
def fresh_server(tmp_path, generator_v1):
    base = tmp_path / "digitgan"
    shutil.copytree(generator_v1, base / "1")
    servers = []

    def start(**overrides):
        options = dict(model_base_path=str(base), port=0, rest_port=0, poll_seconds=0.2, grace_seconds=1.0)
        options.update(overrides)
        server = create_server(ServeConfig(**options))
        server.start()
        assert server.wait_until_ready(60)
        servers.append(server)
        return server, base

    yield start
    for server in servers:
        server.stop(0.5)


def noise_request(rows=1):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digitgan"
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(np.ones([rows, 100], np.float32)))
    return request


def statuses(channel):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digitgan"
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    return [(s.version, s.state, s.status.error_code) for s in stub.GetModelStatus(request, 10).model_version_status]


def copy_atomically(source, base, version):
    temporary = base / f"tmp-{version}"
    shutil.copytree(source, temporary)
    os.rename(temporary, base / str(version))


def test_hot_add_version_without_failures(fresh_server, generator_v2):
    server, base = fresh_server()
    failures, versions, stop = [], [], threading.Event()

    def send_continuously():
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    versions.append(stub.Predict(noise_request(), 10).model_spec.version.value)
                except grpc.RpcError as error:
                    failures.append(error.code())

    thread = threading.Thread(target=send_continuously)
    thread.start()
    try:
        assert wait_for(lambda: len(versions) > 5)
        copy_atomically(generator_v2, base, 2)
        assert wait_for(lambda: versions and versions[-1] == 2)
        count = len(versions)
        assert wait_for(lambda: len(versions) > count + 5)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    first_two = versions.index(2)
    assert set(versions[:first_two]) == {1} and set(versions[first_two:]) == {2}
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        assert wait_for(lambda: statuses(channel) == [(2, AVAILABLE, 0), (1, END, 0)])
        output = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(noise_request(), 10)
    np.testing.assert_allclose(tf.make_ndarray(output.outputs["images"]),
                               models.expected_images(np.ones([1, 100]), scale=2.0), atol=1e-6)


def write_broken_version(base, version):
    broken = base / str(version)
    os.makedirs(broken / "variables")
    (broken / "saved_model.pb").write_bytes(b"this is not a protobuf")


def loads_of(caplog, version):
    return sum(record.getMessage().startswith(f"loading digitgan version {version} ") for record in caplog.records)


def test_broken_version_never_replaces_working_one(fresh_server, caplog):
    caplog.set_level(logging.INFO, logger="serving.manager")
    server, base = fresh_server()
    write_broken_version(base, 7)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        assert wait_for(lambda: statuses(channel)[0][:2] == (7, END))
        version, state, code = statuses(channel)[0]
        assert code != 0
        assert statuses(channel)[1] == (1, AVAILABLE, 0)
        server.manager.poll_once()  # two more full scans, run here: an unchanged broken folder is not retried
        server.manager.poll_once()
        assert loads_of(caplog, 7) == 1
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(noise_request(), 10)
        assert response.model_spec.version.value == 1
    rows = grpc_client.get_status(f"127.0.0.1:{server.grpc_port}")
    assert [row["state"] for row in rows] == ["END", "AVAILABLE"]
    assert cli.served_summary("digitgan", rows).startswith("serving: version 1, the newest that loaded; newer "
                                                           "version(s) [7] failed")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["serving digitgan version(s) [1] in place of version(s) [7], which failed to load "
                        "(GetModelStatus has the error; a changed version folder is tried again)"]  # once


def test_broken_newest_version_at_start_serves_the_newest_that_loads(tmp_path, generator_v1, caplog):
    """The deliberate difference: tensorflow_model_server would serve nothing here until 7 loads."""
    caplog.set_level(logging.INFO, logger="serving.manager")
    base = tmp_path / "digitgan"
    shutil.copytree(generator_v1, base / "1")
    write_broken_version(base, 7)
    server = create_server(ServeConfig(model_base_path=str(base), port=0, rest_port=0, poll_seconds=0.2,
                                       grace_seconds=1.0))
    server.start()
    try:
        assert server.wait_until_ready(60)
        rows = grpc_client.get_status(f"127.0.0.1:{server.grpc_port}")
        assert [(row["version"], row["state"]) for row in rows] == [(7, "END"), (1, "AVAILABLE")]
        assert "version 1, the newest that loaded" in cli.served_summary("digitgan", rows)
        assert any("in place of version(s) [7]" in r.getMessage() for r in caplog.records)
    finally:
        server.stop(0.5)


def test_failing_warmup_fails_the_load(fresh_server, generator_v1):
    server, base = fresh_server()
    candidate = base.parent / "staging"
    shutil.copytree(generator_v1, candidate)
    with tf.io.TFRecordWriter(str(candidate / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        writer.write(b"garbage record")
    os.rename(candidate, base / "3")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        assert wait_for(lambda: statuses(channel)[0][:2] == (3, END))
        assert statuses(channel)[1] == (1, AVAILABLE, 0)


def test_reload_config_and_health_on_stop(fresh_server, generator_v2, tmp_path):
    server, base = fresh_server()
    other_base = tmp_path / "other"
    shutil.copytree(generator_v2, other_base / "5")
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(name="other", base_path=str(other_base), model_platform="tensorflow")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        response = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), 60)
        assert response.status.error_code == 0
        # A label may only name a version already AVAILABLE: it comes in a second config (TF Serving's rule).
        model.version_labels["canary"] = 5
        response = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), 60)
        assert response.status.error_code == 0
        request = noise_request()
        request.model_spec.name = "other"
        request.model_spec.version_label = "canary"
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        assert predict(request, 10).model_spec.version.value == 5
        with pytest.raises(grpc.RpcError) as info:
            predict(noise_request(), 10)  # digitgan was dropped from the config
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
            check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=server.stop, args=(1.0,))
        stopper.start()
        observed = []
        try:
            observed.append(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)
        except grpc.RpcError as error:
            observed.append(error.code())
        stopper.join()
    # Racing the stop, the call sees NOT_SERVING or a refused/cancelled call, never SERVING.
    assert observed[0] in (health_pb2.HealthCheckResponse.NOT_SERVING, grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.CANCELLED)
    assert server.health.Check(health_pb2.HealthCheckRequest(service=""), None).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING


def test_batching_concurrent_requests(fresh_server):
    server, _ = fresh_server(enable_batching=True, max_batch_size=8, batch_timeout_micros=50_000,
                             num_batch_threads=2)
    rng = np.random.default_rng(3)
    noises = [rng.standard_normal((1, 100)).astype(np.float32) for _ in range(16)]
    results, errors = [None] * 16, []
    barrier = threading.Barrier(16)

    def send(index):
        request = noise_request()
        request.inputs["noise"].CopyFrom(tf.make_tensor_proto(noises[index]))
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            barrier.wait()
            try:
                results[index] = tf.make_ndarray(stub.Predict(request, 30).outputs["images"])
            except grpc.RpcError as error:
                errors.append(error)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for noise, images in zip(noises, results):
        np.testing.assert_allclose(images, models.expected_images(noise), rtol=1e-5, atol=1e-6)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(noise_request(rows=9), 10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 9 is larger than maximum input batch size 8" in info.value.details()


def test_batching_without_knobs_uses_tf_defaults_and_takes_a_65_row_request(fresh_server):
    """`--enable-batching` alone: TF's SharedBatchScheduler defaults (a batch of up to 1000 rows)."""
    server, _ = fresh_server(enable_batching=True)
    assert (server.batcher.max_batch_size, server.batcher.timeout, server.batcher.max_enqueued_batches) == (1000, 0, 10)
    assert len(server.batcher._threads) == (os.cpu_count() or 1)
    noise = np.random.default_rng(5).standard_normal((65, 100)).astype(np.float32)
    request = noise_request()
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(noise))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["images"]), models.expected_images(noise),
                               rtol=1e-5, atol=1e-6)


def test_batching_parameters_file_sets_the_knobs_and_unset_ones_take_tf_defaults(fresh_server, tmp_path):
    parameters = tmp_path / "batching.config"
    parameters.write_text("# partial, as TF allows\nmax_batch_size { value: 8 }\nnum_batch_threads { value: 1 }\n")
    server, _ = fresh_server(enable_batching=True, batching_parameters_file=str(parameters))
    assert (server.batcher.max_batch_size, server.batcher.timeout, server.batcher.max_enqueued_batches) == (8, 0, 10)
    assert len(server.batcher._threads) == 1
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(noise_request(rows=9), 10)
    assert "Task size 9 is larger than maximum input batch size 8" in info.value.details()


def test_full_batch_queue_refuses_a_task_and_keeps_the_open_batch_open(fresh_server):
    """One batch may wait (max_enqueued_batches 1). A task too large for the open batch would need a
    second one: UNAVAILABLE, as TF's batch scheduler answers. The open batch is left open, so a
    later task that fits still joins it, and all run once a last task fills it.

    The batch timeout is far longer than the test: each step waits for the batcher's own state,
    so a slow machine cannot close the batch early."""
    server, _ = fresh_server(enable_batching=True, max_batch_size=4, batch_timeout_micros=600_000_000,
                             max_enqueued_batches=1, num_batch_threads=1)
    address = f"127.0.0.1:{server.grpc_port}"
    outcomes = {}

    def send(name, rows):
        with grpc.insecure_channel(address) as channel:
            try:
                response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(noise_request(rows), 60)
                outcomes[name] = tf.make_ndarray(response.outputs["images"]).shape
            except grpc.RpcError as error:
                outcomes[name] = (error.code(), error.details())

    def open_batches():
        """Rows of each batch that waits, as the batcher sees them."""
        with server.batcher._condition:
            return [[task.size for task in batch.tasks] for queue in server.batcher._queues.values() for batch in queue]

    waiting = [threading.Thread(target=send, args=(name, 1)) for name in ("first", "fits")]
    waiting[0].start()
    assert wait_for(lambda: open_batches() == [[1]])  # the first task waits in the open batch
    send("too_large", 4)
    assert outcomes["too_large"] == (grpc.StatusCode.UNAVAILABLE,
                                     "The batch scheduling queue to which this task was submitted is full")
    waiting[1].start()
    # The refusal did not close the first task's batch: the next task joined it, and both still wait.
    assert wait_for(lambda: open_batches() == [[1, 1]]), open_batches()
    assert "first" not in outcomes and "fits" not in outcomes
    send("fills", 2)  # 4 rows: the batch is full and runs
    for thread in waiting:
        thread.join(60)
    assert outcomes["first"] == (1, 28, 28, 1) and outcomes["fits"] == (1, 28, 28, 1)
    assert outcomes["fills"] == (2, 28, 28, 1) and open_batches() == []


def test_client_generate_status_metadata(server):
    address = f"127.0.0.1:{server.grpc_port}"
    images, version = grpc_client.generate(address, digits=[1, 2], count=3, seed=4)
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.float32 and version == 1
    assert 0.0 <= images.min() and images.max() <= 1.0
    again, _ = grpc_client.generate(address, digits=[1, 2], count=3, seed=4)
    np.testing.assert_array_equal(images, again)
    images, version = grpc_client.generate(f"127.0.0.1:1,{address}", count=2, seed=0)  # first server down
    noise = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    np.testing.assert_allclose(images, models.expected_images(noise), rtol=1e-5, atol=1e-6)
    metadata = grpc_client.get_metadata(address)
    assert metadata["version"] == 1
    assert metadata["signatures"]["sample"]["inputs"]["seed"] == {"dtype": "DT_INT64", "shape": [-1]}
    assert grpc_client.get_status(address) == [
        {"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]
    with pytest.raises(grpc_client.ClientError, match="cannot reach digitgan server at 127.0.0.1:1"):
        grpc_client.generate("127.0.0.1:1", count=1, latent_dim=100, timeout=2)
    with pytest.raises(grpc_client.ClientError, match="not found"):
        grpc_client.generate(address, model_name="nope", count=1, latent_dim=100)
    with pytest.raises(grpc_client.ClientError, match="digit must be in 0..9"):
        grpc_client.generate(address, digits=[11])
