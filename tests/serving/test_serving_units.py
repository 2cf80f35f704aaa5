"""Unit tests: the TensorProto parser (with a hypothesis property test), config validation,
version discovery and the tensorflow_model_server command line."""

import math
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.config import file_system_storage_path_source_pb2

from serving import errors, manager, server, tensors
from serving import batching
from serving.config import FREE_PORT, ServeConfig
from serving.errors import ServingError

LIMIT = 10_000


def proto(dtype, shape, **fields):
    result = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        result.tensor_shape.dim.add(size=size)
    return result


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, -2], np.int8), np.array([2**40], np.int64),
    np.array([[True, False]]), np.array([b"a", b"\xff"], dtype=object), np.array([1.5, -0.25], np.float16),
    np.array(3.0, np.float64), np.array([7], np.uint16), np.zeros((0, 3), np.float32)])
@pytest.mark.parametrize("tensor_content", [False, True])
def test_round_trip(array, tensor_content):
    encoded = tensors.ndarray_to_proto(array, tensor_content)
    if array.dtype != object and array.size:
        assert bool(encoded.tensor_content) == tensor_content
    decoded = tensors.proto_to_ndarray(encoded, LIMIT)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("array", [
    np.array([[0.5, -0.0, np.inf], [np.nan, 1e-40, -3.25]], np.float32), np.arange(300, dtype=np.float64),
    np.linspace(-1, 1, 784, dtype=np.float32).reshape(1, 28, 28, 1), np.zeros((0, 2), np.float32),
    np.arange(6, dtype=np.float32).reshape(2, 3).T])  # a non-contiguous view
def test_float_val_written_in_one_copy_is_what_protobuf_writes(array):
    """The fast float_val/double_val path yields the same message, byte for byte, as extend()."""
    fast = tensors.ndarray_to_proto(array)
    slow = tensor_pb2.TensorProto(dtype=fast.dtype, tensor_shape=fast.tensor_shape)
    getattr(slow, "float_val" if array.dtype == np.float32 else "double_val").extend(array.reshape(-1).tolist())
    assert not fast.tensor_content
    assert fast.SerializeToString() == slow.SerializeToString()
    np.testing.assert_array_equal(tensors.proto_to_ndarray(fast, LIMIT), array)


def test_repeat_last_value_and_zero_fill():
    np.testing.assert_array_equal(tensors.proto_to_ndarray(proto(types_pb2.DT_FLOAT, [3], float_val=[2.0]), LIMIT),
                                  [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(tensors.proto_to_ndarray(proto(types_pb2.DT_INT32, [2, 2]), LIMIT), np.zeros((2, 2)))


@pytest.mark.parametrize("bad", [
    proto(types_pb2.DT_FLOAT, [10000, 28, 28, 1], float_val=[1.0]),
    proto(types_pb2.DT_FLOAT, [2**62, 2**62], float_val=[1.0]),
    proto(types_pb2.DT_FLOAT, [-1], float_val=[1.0]),
    proto(types_pb2.DT_FLOAT, [2], float_val=[1.0, 2.0, 3.0]),
    proto(types_pb2.DT_FLOAT, [3], tensor_content=b"\x00" * 11),
    proto(types_pb2.DT_STRING, [1], tensor_content=b"abc"),
    proto(999, [1]),
    proto(types_pb2.DT_RESOURCE, [1]),
    tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape={"unknown_rank": True}),
])
def test_rejected(bad):
    with pytest.raises(ServingError) as info:
        tensors.proto_to_ndarray(bad, LIMIT)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_truncate_message():
    assert errors.truncate_message("x" * 1024) == "x" * 1024
    assert errors.truncate_message("x" * 2000) == "x" * 1024 + "...TRUNCATED"


FIELDS = {dtype: field for dtype, (_np, field) in tensors.DTYPES.items()}
VALUE_STRATEGIES = {
    "float_val": st.floats(width=32, allow_nan=False), "double_val": st.floats(allow_nan=False),
    "int_val": st.integers(-2**31, 2**31 - 1), "int64_val": st.integers(-2**63, 2**63 - 1),
    "uint32_val": st.integers(0, 2**32 - 1), "uint64_val": st.integers(0, 2**64 - 1),
    "bool_val": st.booleans(), "string_val": st.binary(max_size=5), "half_val": st.integers(0, 2**16 - 1),
    "scomplex_val": st.floats(width=32, allow_nan=False), "dcomplex_val": st.floats(allow_nan=False),
}


@st.composite
def tensor_protos(draw):
    dtype = draw(st.sampled_from(sorted(FIELDS) + [types_pb2.DT_INVALID, types_pb2.DT_RESOURCE, 12345]))
    shape = draw(st.lists(st.one_of(st.integers(0, 6), st.integers(-3, 2**40)), max_size=5))
    result = proto(dtype, shape)
    if draw(st.booleans()) and dtype in FIELDS:
        values = draw(st.lists(VALUE_STRATEGIES[FIELDS[dtype]], max_size=12))
        getattr(result, FIELDS[dtype]).extend(values)
    else:
        result.tensor_content = draw(st.binary(max_size=64))
    return result


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_protos())
def test_parser_property(candidate):
    """Either an array of exactly the declared shape, or INVALID_ARGUMENT; never more than LIMIT elements."""
    declared = [d.size for d in candidate.tensor_shape.dim]
    try:
        array = tensors.proto_to_ndarray(candidate, LIMIT)
    except ServingError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert list(array.shape) == declared
    assert array.size <= LIMIT and math.prod(declared) <= LIMIT
    assert array.dtype == tensors.DTYPES[candidate.dtype][0]


def test_config_validation():
    assert ServeConfig().port == 8500
    for bad in (dict(port=-1), dict(rest_port=-2), dict(port=70000), dict(max_batch_size=0),
                dict(engine="docker"), dict(poll_seconds=-1), dict(model_name=""), dict(port=9000, rest_port=9000),
                dict(max_request_elements=True), dict(batch_timeout_micros=-1)):
        with pytest.raises(ValueError) as info:
            ServeConfig(**bad)
        assert repr(list(bad.values())[-1]) in str(info.value)


def test_rest_port_zero_is_off_and_free_port_is_for_programs():
    assert ServeConfig(rest_port=0).rest_port == 0 and ServeConfig(rest_port=FREE_PORT).rest_port == FREE_PORT
    assert ServeConfig(port=0, rest_port=0).port == 0  # both 0: gRPC on a free port, no REST


def test_batching_settings_validation(tmp_path):
    with pytest.raises(ValueError, match="batching_parameters_file is set without setting enable_batching"):
        ServeConfig(batching_parameters_file="serving/deploy/batching.config")
    with pytest.raises(ValueError, match="not both.*max_batch_size"):
        ServeConfig(enable_batching=True, batching_parameters_file="b.config", max_batch_size=8)
    assert ServeConfig(enable_batching=True).batching_knobs() == {}
    assert batching.resolve_options() == batching.BatchingOptions(1000, 0, 10, os.cpu_count() or 1)


@pytest.mark.parametrize("text, message", [
    ("max_batch_size: 8", "Invalid protobuf file"),                      # an Int64Value, not a scalar
    ("max_batch_size { value: 8 } no_such_field { value: 1 }", "no_such_field"),
    ("max_batch_size { value: 0 }", "max_batch_size .* must be >= 1, got 0"),
    ("batch_timeout_micros { value: -1 }", "must be >= 0"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: 4 allowed_batch_sizes: 6",
     "Last entry in allowed_batch_sizes must match max_batch_size; last entry was 6; expected 8"),
])
def test_bad_batching_parameters_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "batching.config"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        batching.read_batching_parameters_file(str(path))


def test_batching_parameters_file_reads_every_tf_field(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 128 } batch_timeout_micros { value: 0 } max_enqueued_batches "
                    "{ value: 1000000 } num_batch_threads { value: 8 } thread_pool_name { value: 'x' } "
                    "allowed_batch_sizes: 64 allowed_batch_sizes: 128 pad_variable_length_inputs: true "
                    "enable_large_batch_splitting { value: false } max_execution_batch_size { value: 64 }")
    assert batching.read_batching_parameters_file(str(path)) == {
        "max_batch_size": 128, "batch_timeout_micros": 0, "max_enqueued_batches": 1000000, "num_batch_threads": 8}
    with pytest.raises(ValueError, match="cannot read batching_parameters_file"):
        batching.read_batching_parameters_file(str(tmp_path / "missing.config"))


def test_version_discovery_and_policies(tmp_path):
    for name in ("1", "00017", "3", "temp-4", "not_a_version"):
        os.makedirs(tmp_path / name)
    (tmp_path / "9").write_text("a file, not a directory")
    found = manager.discover_versions(str(tmp_path))
    assert sorted(found) == [1, 3, 17]
    policy = file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy()
    assert manager.select_versions(policy, list(found)) == {17}
    policy.latest.num_versions = 2
    assert manager.select_versions(policy, list(found)) == {17, 3}
    policy.all.SetInParent()
    assert manager.select_versions(policy, list(found)) == {1, 3, 17}
    policy.specific.versions.extend([3, 99])
    assert manager.select_versions(policy, list(found)) == {3}


def test_tfserving_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    config = ServeConfig(engine="tfserving", enable_batching=True, model_base_path="models/x")
    with pytest.raises(ValueError, match="tensorflow_model_server is not on PATH"):
        server.tfserving_command(config)
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    command = server.tfserving_command(config, "/tmp/batching.txt")
    assert command[1:] == ["--port=8500", "--rest_api_port=8501", "--file_system_poll_wait_seconds=1",
                           "--model_name=digitgan", f"--model_base_path={os.path.abspath('models/x')}",
                           "--enable_batching=true", "--batching_parameters_file=/tmp/batching.txt"]
    # Without a file or knobs, TF's own defaults apply: no file at all.
    assert server.tfserving_command(config)[-1] == "--enable_batching=true"
    assert server.batching_parameters_text(config) == ""
    knobs = ServeConfig(enable_batching=True, max_batch_size=64)
    assert server.batching_parameters_text(knobs) == "max_batch_size { value: 64 }\n"
    no_rest = ServeConfig(engine="tfserving", rest_port=0)
    assert "--rest_api_port=0" in server.tfserving_command(no_rest)
    with pytest.raises(ValueError, match="cannot pick free ports"):
        server.tfserving_command(ServeConfig(engine="tfserving", rest_port=FREE_PORT))
