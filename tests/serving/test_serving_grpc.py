"""Predict, metadata and status over real gRPC, and every error case with its exact code."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

import serving_test_models as models


def predict_request(signature="", model="digitgan", **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for alias, value in inputs.items():
        if isinstance(value, tensor_pb2.TensorProto):
            request.inputs[alias].CopyFrom(value)
        else:
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def typed_proto(array):
    """The same tensor in the *_val encoding (as the hand-written TF Serving test client)."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.float_val.extend(array.reshape(-1).tolist())
    return proto


def expect_error(call, request, code, text=None):
    with pytest.raises(grpc.RpcError) as info:
        call(request, 10)
    assert info.value.code() == code, info.value.details()
    if text is not None:
        assert text in info.value.details()
    return info.value.details()


NOISE = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)


@pytest.mark.parametrize("encode", [tf.make_tensor_proto, typed_proto], ids=["tensor_content", "float_val"])
def test_predict_default_both_encodings(prediction_stub, encode):
    proto = encode(NOISE)
    assert bool(proto.tensor_content) == (encode is tf.make_tensor_proto)
    response = prediction_stub.Predict(predict_request(noise=proto), 10)
    assert response.model_spec.name == "digitgan"
    assert response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == 1
    images = response.outputs["images"]
    assert images.dtype == types_pb2.DT_FLOAT and not images.tensor_content
    assert [d.size for d in images.tensor_shape.dim] == [3, 28, 28, 1]
    got = np.array(images.float_val, np.float32).reshape(3, 28, 28, 1)
    np.testing.assert_allclose(got, models.expected_images(NOISE), rtol=1e-5, atol=1e-6)


def test_predict_repeats_last_value(prediction_stub):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.0])
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=100)
    response = prediction_stub.Predict(predict_request(noise=proto), 10)
    got = tf.make_ndarray(response.outputs["images"])
    np.testing.assert_allclose(got, models.expected_images(np.zeros((2, 100))), atol=1e-6)


def test_predict_conditional_and_label(prediction_stub):
    request = predict_request("conditional", noise=NOISE[:2], digit=np.array([0, 9], np.int32))
    request.model_spec.version_label = "stable"
    response = prediction_stub.Predict(request, 10)
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "conditional"
    assert tf.make_ndarray(response.outputs["images"]).shape == (2, 28, 28, 1)


def test_predict_sample_with_output_filter(prediction_stub):
    request = predict_request("sample", digit=np.array([3, 4], np.int32), seed=np.array([7, 8], np.int64))
    response = prediction_stub.Predict(request, 10)
    assert set(response.outputs) == {"images", "png_bytes"}
    pngs = list(response.outputs["png_bytes"].string_val)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    request.output_filter.append("images")
    filtered = prediction_stub.Predict(request, 10)
    assert set(filtered.outputs) == {"images"}
    np.testing.assert_array_equal(tf.make_ndarray(filtered.outputs["images"]),
                                  tf.make_ndarray(response.outputs["images"]))


def test_metadata(prediction_stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digitgan"
    response = prediction_stub.GetModelMetadata(request, 10)
    assert response.model_spec.version.value == 1
    assert response.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert set(signature_map.signature_def) == {"serving_default", "conditional", "sample", "__saved_model_init_op"}
    noise = signature_map.signature_def["serving_default"].inputs["noise"]
    assert noise.dtype == types_pb2.DT_FLOAT and [d.size for d in noise.tensor_shape.dim] == [-1, 100]
    empty = get_model_metadata_pb2.GetModelMetadataRequest()
    empty.model_spec.name = "digitgan"
    expect_error(prediction_stub.GetModelMetadata, empty, grpc.StatusCode.INVALID_ARGUMENT,
                 "GetModelMetadataRequest must specify at least one metadata_field")


def test_status(model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digitgan"
    response = model_stub.GetModelStatus(request, 10)
    [status] = response.model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    request.model_spec.name = "nope"
    expect_error(model_stub.GetModelStatus, request, grpc.StatusCode.NOT_FOUND,
                 "Could not find any versions of model nope")
    request.model_spec.name = "digitgan"
    request.model_spec.version.value = 5
    expect_error(model_stub.GetModelStatus, request, grpc.StatusCode.NOT_FOUND, "Could not find version 5")


def test_unknown_model_version_label_signature(prediction_stub):
    call = prediction_stub.Predict
    expect_error(call, predict_request(model="nope", noise=NOISE), grpc.StatusCode.NOT_FOUND,
                 "Servable not found for request: Latest(nope)")
    request = predict_request(noise=NOISE)
    request.model_spec.version.value = 42
    expect_error(call, request, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(digitgan, 42)")
    request = predict_request(noise=NOISE)
    request.model_spec.version_label = "canary"
    expect_error(call, request, grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: canary")
    expect_error(call, predict_request("nosig", noise=NOISE), grpc.StatusCode.FAILED_PRECONDITION,
                 'Serving signature key "nosig" not found.')
    expect_error(call, predict_pb2.PredictRequest(), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def test_input_errors(prediction_stub):
    call = prediction_stub.Predict
    details = expect_error(call, predict_request(), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == ("input size does not match signature: 0!=1 len({}) != len({noise}). "
                       "Sent extra: {}. Missing but required: {noise}.")
    expect_error(call, predict_request(noise=NOISE, extra=NOISE), grpc.StatusCode.INVALID_ARGUMENT,
                 "Sent extra: {extra}")
    # saved_model::GetInputValues' words (TF Serving's Predict since signature defaults)
    expect_error(call, predict_request(other=NOISE), grpc.StatusCode.INVALID_ARGUMENT,
                 "Signature input alias: noise(feed name: serving_default_noise:0) not found in request and no "
                 "default value provided. Inputs expected to be in the request {other}, or default input alias set: ")
    expect_error(call, predict_request(noise=NOISE.astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT)
    expect_error(call, predict_request(noise=np.zeros([2, 7], np.float32)), grpc.StatusCode.INVALID_ARGUMENT)


def test_output_filter_errors(prediction_stub):
    request = predict_request(noise=NOISE)
    request.output_filter.append("nope")
    expect_error(prediction_stub.Predict, request, grpc.StatusCode.INVALID_ARGUMENT,
                 "output tensor alias not found in signature: nope Outputs expected to be in the set {images}.")
    request = predict_request(noise=NOISE)
    request.output_filter.extend(["images", "images"])
    expect_error(prediction_stub.Predict, request, grpc.StatusCode.INVALID_ARGUMENT,
                 "duplicate output tensor alias: images")


def test_malicious_tensors(prediction_stub):
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    for size in (10000, 28, 28, 1):
        huge.tensor_shape.dim.add(size=size)
    assert len(huge.SerializeToString()) < 40
    expect_error(prediction_stub.Predict, predict_request(noise=huge), grpc.StatusCode.INVALID_ARGUMENT,
                 "more than the limit")
    short = tf.make_tensor_proto(NOISE)
    short.tensor_content = short.tensor_content[:-4]
    expect_error(prediction_stub.Predict, predict_request(noise=short), grpc.StatusCode.INVALID_ARGUMENT,
                 "tensor_content has")
    negative = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    negative.tensor_shape.dim.add(size=-5)
    expect_error(prediction_stub.Predict, predict_request(noise=negative), grpc.StatusCode.INVALID_ARGUMENT)
    bad_dtype = tensor_pb2.TensorProto(dtype=999)
    expect_error(prediction_stub.Predict, predict_request(noise=bad_dtype), grpc.StatusCode.INVALID_ARGUMENT)


def test_digit_out_of_range(prediction_stub):
    request = predict_request("sample", digit=np.array([10], np.int32), seed=np.array([1], np.int64))
    expect_error(prediction_stub.Predict, request, grpc.StatusCode.INVALID_ARGUMENT, "digit must be in 0..9")


class ExpiredContext:
    """A servicer context whose deadline has already passed."""

    def time_remaining(self):
        return 0.0

    def abort(self, code, details):
        raise RuntimeError((code, details))


def test_expired_deadline_skips_work(server):
    from serving.request_runner import RequestRunner

    calls = []
    runner = RequestRunner(server.manager, server.metrics)
    with pytest.raises(RuntimeError) as info:
        runner.serve(ExpiredContext(), "Predict", "digitgan", lambda: calls.append(1))
    assert info.value.args[0][0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert calls == []


def test_unexpected_exception_is_hidden(server):
    from serving.request_runner import RequestRunner

    class Context(ExpiredContext):
        def time_remaining(self):
            return None

    def broken():
        raise ValueError("secret internals")

    with pytest.raises(RuntimeError) as info:
        RequestRunner(server.manager).serve(Context(), "Predict", "digitgan", broken)
    assert info.value.args[0] == (grpc.StatusCode.INTERNAL, "internal error")
