"""Small SavedModels for the serving tests: a TF2 digitgan look-alike and a TF1 half_plus_two."""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

LATENT_DIM = 100


class TinyGenerator(tf.Module):
    """images = sigmoid(scale * noise @ w); the same signatures as the digitgan bundle."""

    def __init__(self, scale: float):
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal([LATENT_DIM, 784], seed=[1, 2]) * 0.05)
        self.digit_bias = tf.Variable(tf.linspace(-1.0, 1.0, 10))
        self.scale = tf.constant(scale)

    def _images(self, noise, bias):
        logits = self.scale * tf.matmul(noise, self.w) + bias[:, None]
        return tf.reshape(tf.sigmoid(logits), [-1, 28, 28, 1])

    @tf.function(input_signature=[tf.TensorSpec([None, LATENT_DIM], tf.float32, name="noise")])
    def default(self, noise):
        return {"images": self._images(noise, tf.zeros([tf.shape(noise)[0]]))}

    @tf.function(input_signature=[tf.TensorSpec([None, LATENT_DIM], tf.float32, name="noise"),
                                  tf.TensorSpec([None], tf.int32, name="digit")])
    def conditional(self, noise, digit):
        return {"images": self._images(noise, self._checked_bias(digit))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="digit"),
                                  tf.TensorSpec([None], tf.int64, name="seed")])
    def sample(self, digit, seed):
        bias = self._checked_bias(digit)
        noise = tf.map_fn(lambda s: tf.random.stateless_normal([LATENT_DIM], seed=tf.stack([s, s])),
                          seed, fn_output_signature=tf.float32)
        images = self._images(noise, bias)
        png = tf.map_fn(lambda image: tf.io.encode_png(tf.cast(image * 255.0, tf.uint8)), images,
                        fn_output_signature=tf.string)
        return {"images": images, "png_bytes": png}

    def _checked_bias(self, digit):
        checks = [tf.debugging.assert_greater_equal(digit, 0, message="digit must be in 0..9"),
                  tf.debugging.assert_less_equal(digit, 9, message="digit must be in 0..9")]
        with tf.control_dependencies(checks):  # check before gather, which would fail first
            return tf.gather(self.digit_bias, digit)


def build_generator(path: str, scale: float = 1.0, warmup: bool = True) -> str:
    module = TinyGenerator(scale)
    signatures = {"serving_default": module.default, "conditional": module.conditional, "sample": module.sample}
    tf.saved_model.save(module, path, signatures=signatures)
    if warmup:
        write_warmup(path)
    return path


def expected_images(noise: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """What `serving_default` of build_generator(scale) returns for `noise`."""
    w = (tf.random.stateless_normal([LATENT_DIM, 784], seed=[1, 2]) * 0.05).numpy()
    return (1 / (1 + np.exp(-(scale * noise.astype(np.float32) @ w)))).reshape(-1, 28, 28, 1)


def write_warmup(path: str, records: int = 2) -> None:
    directory = os.path.join(path, "assets.extra")
    os.makedirs(directory, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(directory, "tf_serving_warmup_requests")) as writer:
        for _ in range(records):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "digitgan"
            request.inputs["noise"].CopyFrom(tf.make_tensor_proto(np.zeros([1, LATENT_DIM], np.float32)))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def build_half_plus_two(path: str) -> str:
    """TF1 graph model y = 0.5 x + 2 with predict, regress and classify signatures."""
    v1 = tf.compat.v1
    utils = v1.saved_model.signature_def_utils
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        serialized = v1.placeholder(tf.string, name="tf_example")
        parsed = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        x = tf.identity(parsed["x"], name="x")
        a, b = v1.Variable(0.5, name="a"), v1.Variable(2.0, name="b")
        y = tf.add(a * x, b, name="y")
        session.run(v1.global_variables_initializer())
        predict = utils.predict_signature_def(inputs={"x": x}, outputs={"y": y})
        builder = v1.saved_model.Builder(path)
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={
            "serving_default": predict,
            "regress_x_to_y": utils.regression_signature_def(serialized, y),
            "classify_x_to_y": utils.classification_signature_def(serialized, None, y),
        })
        builder.save()
    return path


def build_gate(path: str) -> str:
    """TF1 model whose requests block inside the graph until the test lets them through.

    It makes "slow requests in flight" deterministic without sleeps. Only standard queue
    ops, so TF Serving could load it too. Signatures:
      serving_default: x -> y = x + token; records its arrival in the `arrived` queue, then
          takes one token from the `tokens` queue, blocking while that queue is empty.
      add_one: x -> y = x + 1, never blocks.
      release: count (int32 scalar) -> released; puts `count` tokens into `tokens`.
      arrivals: () -> arrivals (int32); how many graph runs reached the gate so far.
    """
    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        arrived = tf.queue.FIFOQueue(1_000_000, [tf.float32], shapes=[[]], name="arrived")
        tokens = tf.queue.FIFOQueue(1_000_000, [tf.float32], shapes=[[]], name="tokens")
        x = v1.placeholder(tf.float32, [None], name="x")
        with tf.control_dependencies([arrived.enqueue(0.0)]):  # count before blocking
            token = tokens.dequeue()
        count = v1.placeholder(tf.int32, [], name="count")
        with tf.control_dependencies([tokens.enqueue_many(tf.zeros([count]))]):
            released = tf.identity(count, name="released")
        builder = v1.saved_model.Builder(path)
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={
            "serving_default": _predict_signature({"x": x}, {"y": tf.add(x, token, name="y")}),
            "add_one": _predict_signature({"x": x}, {"y": tf.add(x, 1.0, name="y_plus_one")}),
            "release": _predict_signature({"count": count}, {"released": released}),
            "arrivals": _predict_signature({}, {"arrivals": arrived.size(name="arrivals")}),
        })
        builder.save()
    return path


def _predict_signature(inputs: dict, outputs: dict):
    """A predict SignatureDef; unlike predict_signature_def it allows no inputs."""
    v1 = tf.compat.v1
    info = v1.saved_model.utils.build_tensor_info
    return v1.saved_model.signature_def_utils.build_signature_def(
        {alias: info(tensor) for alias, tensor in inputs.items()},
        {alias: info(tensor) for alias, tensor in outputs.items()},
        v1.saved_model.signature_constants.PREDICT_METHOD_NAME)


def wait_for(condition, timeout: float = 120.0, interval: float = 0.05) -> bool:
    """Polls until condition() holds. Only a safety net against hangs, never a timing check: every
    caller asserts it becomes true, so the generous timeout costs nothing when things work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def build_strings(path: str) -> str:
    """TF1 graph model for the REST writer's rules. Signatures:
      serving_default: s (string [-1]) -> text = s and text_bytes = s (a DT_STRING output with
          and without the `_bytes` suffix that makes TF Serving write base64);
      floats: x (float32 [-1]) -> y = x (float32) and y64 = x as float64;
      uninitialized: x (float32 [-1]) -> y = x + a resource variable nobody ever assigned,
          so every run fails with FAILED_PRECONDITION, over gRPC and REST alike.
    """
    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        strings = v1.placeholder(tf.string, [None], name="s")
        x = v1.placeholder(tf.float32, [None], name="x")
        # A bare handle, not a tf.Variable: the saver ignores it and nothing initializes it.
        handle = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="never_assigned")
        unset = tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)
        builder = v1.saved_model.Builder(path)
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={
            "serving_default": _predict_signature(
                {"s": strings}, {"text": tf.identity(strings, name="text"),
                                 "text_bytes": tf.identity(strings, name="text_bytes")}),
            "floats": _predict_signature(
                {"x": x}, {"y": tf.identity(x, name="y"), "y64": tf.cast(x, tf.float64, name="y64")}),
            "uninitialized": _predict_signature({"x": x}, {"y": tf.add(x, unset, name="y_unset")}),
        })
        builder.save()
    return path


@contextlib.contextmanager
def running_server(**settings):
    """A started `create_server(ServeConfig(**settings))` whose models have loaded; stopped after."""
    from serving.config import ServeConfig
    from serving.server import create_server

    model_server = create_server(ServeConfig(**settings))
    model_server.start()
    try:
        assert model_server.wait_until_ready(60)
        yield model_server
    finally:
        model_server.stop(1.0)
