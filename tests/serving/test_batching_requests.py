"""Server-side batching over real gRPC and REST: requests of both transports (REST rows and
columns) share one batch, and a request that would fail alone fails alone in a batch.

Requests meet in one batch by construction: max_batch_size is the number of rows sent and the
batch timeout is a minute, so the batch runs exactly when the last request has joined it. The
batcher's counts (tasks, batches, graph runs) show it, not timing.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.config import FREE_PORT
from serving_test_models import running_server

ROWS = 4  # max_batch_size, and the rows each test sends into the batcher
DIGIT_ERROR = "digit must be in 0..9"


@pytest.fixture(scope="module")
def batching_server(model_root):
    with running_server(model_base_path=str(model_root / "digitgan"), port=0, rest_port=FREE_PORT, poll_seconds=0,
                        grace_seconds=1.0, enable_batching=True, max_batch_size=ROWS,
                        batch_timeout_micros=60_000_000, num_batch_threads=1) as model_server:
        yield model_server


@pytest.fixture(scope="module")
def sample(model_root):
    """The `sample` signature run directly, unbatched: what each request must get."""
    signature = tf.saved_model.load(str(model_root / "digitgan" / "1")).signatures["sample"]

    def images(digits, seeds):
        return signature(digit=tf.constant(digits, tf.int32), seed=tf.constant(seeds, tf.int64))["images"].numpy()
    return images


# Each sender returns ("ok", images) or ("error", gRPC code or HTTP status, message).
def grpc_sender(server, digits, seeds):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digitgan"
    request.model_spec.signature_name = "sample"
    request.inputs["digit"].CopyFrom(tf.make_tensor_proto(np.asarray(digits, np.int32)))
    request.inputs["seed"].CopyFrom(tf.make_tensor_proto(np.asarray(seeds, np.int64)))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        try:
            reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 120)
        except grpc.RpcError as error:
            return "error", error.code(), error.details()
    return "ok", tf.make_ndarray(reply.outputs["images"])


def rest_post(server, document):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=120)
    try:
        connection.request("POST", "/v1/models/digitgan:predict", json.dumps(document),
                           {"Content-Type": "application/json"})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def rows_sender(server, digits, seeds):
    instances = [{"digit": digit, "seed": seed} for digit, seed in zip(digits, seeds)]
    instances += [{"digit": digit} for digit in digits[len(seeds):]]  # ragged when seeds run short
    status, document = rest_post(server, {"signature_name": "sample", "instances": instances})
    if status != 200:
        return "error", status, document["error"]
    return "ok", np.asarray([prediction["images"] for prediction in document["predictions"]], np.float32)


def columns_sender(server, digits, seeds):
    status, document = rest_post(server, {"signature_name": "sample", "inputs": {"digit": digits, "seed": seeds}})
    if status != 200:
        return "error", status, document["error"]
    return "ok", np.asarray(document["outputs"]["images"], np.float32)


SENDERS = {"grpc": grpc_sender, "rows": rows_sender, "columns": columns_sender}


def send_together(server, requests):
    """Send (sender name, digits, seeds) requests at once, each on its own connection; their outcomes,
    and how the batcher's counts moved."""
    before = server.batcher.counts()
    start = threading.Barrier(len(requests))

    def send(name, digits, seeds):
        start.wait()
        return SENDERS[name](server, digits, seeds)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(lambda request: send(*request), requests))
    after = server.batcher.counts()
    return outcomes, {name: after[name] - before[name] for name in after}


def test_rest_rows_and_columns_share_a_batch_with_grpc(batching_server, sample):
    requests = [("grpc", [1], [11]), ("rows", [2, 3], [12, 13]), ("columns", [4], [14])]  # 4 rows
    outcomes, counts = send_together(batching_server, requests)
    assert counts == {"tasks": 3, "batches": 1, "runs": 1}
    for (_, digits, seeds), outcome in zip(requests, outcomes):
        assert outcome[0] == "ok", outcome
        np.testing.assert_allclose(outcome[1], sample(digits, seeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["grpc", "rows", "columns"])
def test_a_bad_request_in_a_batch_fails_alone(batching_server, sample, bad):
    """A digit of 10 joins the batch and fails alone; ragged requests (digit and seed of different
    lengths) are refused before they join it. Everyone else gets their own images."""
    good = [name for name in SENDERS if name != bad]
    requests = [(good[0], [1], [21]), (good[1], [2], [22]), (good[0], [3], [23]),  # 3 good rows
                (bad, [10], [24]),  # 1 bad row: the 4th of the batch
                ("grpc", [5, 6], [25]), ("columns", [5, 6], [25]), ("rows", [5, 6], [25])]  # ragged
    outcomes, counts = send_together(batching_server, requests)
    # One batch of the 4 rows; its failed run was split in halves (2 runs) and the failing half
    # in single tasks (2 runs).
    assert counts == {"tasks": 4, "batches": 1, "runs": 5}
    for (_, digits, seeds), outcome in zip(requests[:3], outcomes[:3]):
        assert outcome[0] == "ok", outcome
        np.testing.assert_allclose(outcome[1], sample(digits, seeds), rtol=1e-5, atol=1e-6)
    kind, code, message = outcomes[3]
    assert (kind, code) == ("error", grpc.StatusCode.INVALID_ARGUMENT if bad == "grpc" else 400)
    assert DIGIT_ERROR in message
    assert outcomes[4] == ("error", grpc.StatusCode.INVALID_ARGUMENT,
                           "Batching session Run() input tensors must have equal 0th-dimension size")
    assert outcomes[5] == ("error", 400, "Batching session Run() input tensors must have equal 0th-dimension size")
    assert outcomes[6][:2] == ("error", 400)
