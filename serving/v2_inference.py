"""The Open Inference Protocol (KServe "v2") on the served models: what its REST front end
(v2_rest.py) and its gRPC front end (v2_grpc.py) share.

How the served models appear as v2 models: the model `digitgan` is its `serving_default`
signature, and `digitgan.sample` its `sample` signature (`<model>.<signature>` for any
signature), so each v2 model has one fixed set of inputs and outputs, as v2 model metadata
describes them and v2 clients build their requests from. A configured model name is always
taken whole first (a model named `a.b` is never model `a`'s signature `b`). The version string
is a version number, or else a version label (`stable`), as ModelSpec's `version_label`.

Inference runs through inference.predict_arrays: the same checks, the same batcher and the same
session runs as TF Serving's Predict; the request-size limit is checked on each input's declared
shape before its data is decoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import struct
from typing import Callable

import grpc
import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import model_pb2

from serving import inference, tensors
from serving.errors import ServingError, invalid_argument

SIGNATURE_SEPARATOR = "."
PLATFORM = "tensorflow_savedmodel"  # Triton's name for a SavedModel's platform
SERVER_NAME = "digitgan"
EXTENSIONS = ("binary_tensor_data",)

# TF DataType -> v2 datatype; every TF type the protocol can carry.
V2_DATATYPES = {
    types_pb2.DT_BOOL: "BOOL", types_pb2.DT_UINT8: "UINT8", types_pb2.DT_UINT16: "UINT16",
    types_pb2.DT_UINT32: "UINT32", types_pb2.DT_UINT64: "UINT64", types_pb2.DT_INT8: "INT8",
    types_pb2.DT_INT16: "INT16", types_pb2.DT_INT32: "INT32", types_pb2.DT_INT64: "INT64",
    types_pb2.DT_HALF: "FP16", types_pb2.DT_FLOAT: "FP32", types_pb2.DT_DOUBLE: "FP64",
    types_pb2.DT_STRING: "BYTES",
}
if types_pb2.DT_BFLOAT16 in tensors.DTYPES:
    V2_DATATYPES[types_pb2.DT_BFLOAT16] = "BF16"
NUMPY_DTYPES = {name: tensors.DTYPES[enum][0] for enum, name in V2_DATATYPES.items()}  # object for BYTES


@functools.cache  # the installed version does not change while the server runs; read it once
def server_version() -> str:
    try:
        return importlib.metadata.version("digitgan")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def datatype_of(dtype_enum: int) -> str:
    """The v2 datatype of a TF DataType, or INVALID_ARGUMENT when the protocol has none."""
    if dtype_enum not in V2_DATATYPES:
        raise invalid_argument(f"the Open Inference Protocol has no datatype for {tensors.dtype_name(dtype_enum)}")
    return V2_DATATYPES[dtype_enum]


def datatype_of_array(array: np.ndarray) -> str:
    return datatype_of(tensors.dtype_enum_of(array))


def tensor_metadata(tensor_infos) -> list[dict]:
    """[{name, datatype, shape}] of a signature's inputs or outputs, by alias; -1 for a dimension
    of unknown size, and [-1] for a tensor of unknown rank."""
    described = []
    for alias in sorted(tensor_infos):
        info = tensor_infos[alias]
        shape = [-1] if info.tensor_shape.unknown_rank else [dim.size for dim in info.tensor_shape.dim]
        described.append({"name": alias, "datatype": datatype_of(info.dtype), "shape": shape})
    return described


# ---------------- model names and versions ----------------
@dataclasses.dataclass(frozen=True)
class Target:
    """A v2 model name resolved: the served model and the signature it names."""
    name: str  # as the client wrote it
    model: str
    signature: str


def resolve(model_names, name: str) -> Target:
    """The served model and signature a v2 model name stands for (NOT_FOUND when none)."""
    if not name:
        raise invalid_argument("Missing model name")
    if name in model_names:
        return Target(name, name, inference.DEFAULT_SIGNATURE)
    for model in sorted(model_names, key=len, reverse=True):  # the longest model name that fits
        if name.startswith(model + SIGNATURE_SEPARATOR) and len(name) > len(model) + 1:
            return Target(name, model, name[len(model) + 1:])
    raise unknown_model(name)


def unknown_model(name: str, detail: str = "") -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found{detail}")


def model_spec(target: Target, version: str) -> model_pb2.ModelSpec:
    """The ModelSpec of a v2 request: the latest version for "", a number, else a version label."""
    spec = model_pb2.ModelSpec(name=target.model, signature_name=target.signature)
    if version.isascii() and version.isdigit():
        if len(version.lstrip("0")) > 19 or int(version) >= 2**63:
            raise invalid_argument(f"model version {version} is not an int64")
        spec.version.value = int(version)
    elif version:
        spec.version_label = version
    return spec


# ---------------- request tensors ----------------
@dataclasses.dataclass(frozen=True)
class RequestInput:
    """One input of an inference request: decode(datatype, shape, element count) builds its array
    once the name, datatype, shape and size limit are checked."""
    name: str
    datatype: str
    shape: tuple
    decode: Callable[[str, tuple, int], np.ndarray]


def _wire_dtype(datatype: str) -> np.dtype:
    """The little-endian dtype of a fixed-size datatype on the wire (BOOL: one byte each)."""
    return np.dtype(np.uint8) if datatype == "BOOL" else NUMPY_DTYPES[datatype].newbyteorder("<")


def array_from_raw(datatype: str, shape: tuple, count: int, raw: bytes) -> np.ndarray:
    """An array from the protocol's raw bytes: little-endian, row-major, no padding; BYTES
    elements each a 4-byte little-endian length and then the bytes."""
    if datatype == "BYTES":
        return split_bytes(raw, count).reshape(shape)
    wire = _wire_dtype(datatype)
    needed = count * wire.itemsize
    if len(raw) != needed:
        raise invalid_argument(f"{len(raw)} bytes of raw data, but shape {list(shape)} of {datatype} needs {needed}")
    array = np.frombuffer(raw, dtype=wire).reshape(shape)
    if datatype == "BOOL":
        return array != 0
    return array.astype(NUMPY_DTYPES[datatype], copy=False)


def split_bytes(raw: bytes, count: int) -> np.ndarray:
    """The `count` length-prefixed elements of a raw BYTES tensor, as an object array of bytes."""
    if count * 4 > len(raw):
        raise invalid_argument(f"{len(raw)} bytes of raw data cannot hold {count} BYTES elements")
    items = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise invalid_argument(f"raw BYTES data ends inside the length of element {index}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid_argument(f"raw BYTES element {index} of {length} bytes runs past the end of the data")
        items[index] = raw[offset:offset + length]
        offset += length
    if offset != len(raw):
        raise invalid_argument(f"{len(raw) - offset} bytes of raw data are left after {count} BYTES elements")
    return items


def array_from_values(datatype: str, shape: tuple, count: int, values) -> np.ndarray:
    """An array from a flat sequence of values (JSON `data`, gRPC typed contents), refusing a
    wrong count and integers outside the datatype's range."""
    if len(values) != count:
        raise invalid_argument(f"{len(values)} values given, but shape {list(shape)} holds {count}")
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [value.encode("utf-8") if isinstance(value, str) else bytes(value) for value in values]
        return array.reshape(shape)
    if dtype.kind in "iu" and count:
        limits = np.iinfo(dtype)
        for value in (min(values), max(values)):
            if not limits.min <= value <= limits.max:
                raise invalid_argument(f"value {value} is out of range for {datatype}")
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError, TypeError) as error:
        raise invalid_argument(f"values are not {datatype}: {error}") from None


def raw_bytes(array: np.ndarray) -> bytes:
    """An output array as the protocol's raw bytes (see array_from_raw)."""
    datatype = datatype_of_array(array)
    if datatype == "BOOL":
        return np.ascontiguousarray(array, dtype=np.bool_).tobytes()  # one byte, 0 or 1, each
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=_wire_dtype(datatype)).tobytes()
    parts = []
    for item in array.reshape(-1):
        value = tensors.as_bytes(item)
        parts += (struct.pack("<I", len(value)), value)
    return b"".join(parts)


def _check_shape(target: Target, tensor: RequestInput, info) -> None:
    """The request's shape against the signature's: same rank, same size where fixed (as Triton)."""
    if info.tensor_shape.unknown_rank:
        return
    expected = [dim.size for dim in info.tensor_shape.dim]
    if len(expected) != len(tensor.shape) or any(want not in (-1, got) for want, got in zip(expected, tensor.shape)):
        raise invalid_argument(f"unexpected shape for input '{tensor.name}' for model '{target.name}'. "
                               f"Expected {expected}, got {list(tensor.shape)}")


# ---------------- the models as the protocol sees them ----------------
class V2Models:
    """Readiness, metadata and inference of v2 models over the model manager.

    `stopping()` is true once the server has begun to stop: the server is then neither live
    nor ready, as load balancers need to see it.
    """

    def __init__(self, manager, max_request_elements: int, batcher=None, stopping=lambda: False):
        self.manager = manager
        self.max_request_elements = max_request_elements
        self.batcher = batcher
        self._stopping = stopping

    def server_live(self) -> bool:
        return not self._stopping()

    def server_ready(self) -> bool:
        """True while every configured model has a version available, as the protocol's server ready."""
        return not self._stopping() and self.manager.all_models_available()

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def resolve(self, name: str) -> Target:
        return resolve(self.manager.available_models(), name)

    def metrics_name(self, name: str) -> str:
        """The served model a request is counted under in the metrics (its own name when unknown)."""
        try:
            return self.resolve(name).model
        except ServingError:
            return name

    @contextlib.contextmanager
    def version(self, name: str, version: str):
        """(target, loaded version, signature) held for the length of a request."""
        target = self.resolve(name)
        loaded = self.manager.acquire(model_spec(target, version))
        try:
            signature = loaded.signature_defs.get(target.signature)
            if signature is None:
                raise unknown_model(name, f": model '{target.model}' version {loaded.version} has no signature "
                                          f"'{target.signature}'")
            yield target, loaded, signature
        finally:
            loaded.release()

    def model_ready(self, name: str, version: str) -> tuple[bool, str]:
        """(ready, why not): ready when the version asked for (the latest when "") is loaded."""
        try:
            with self.version(name, version):
                return True, ""
        except ServingError as error:
            return False, error.message

    def metadata(self, name: str, version: str) -> dict:
        with self.version(name, version) as (target, _loaded, signature):
            versions = self.manager.available_models().get(target.model, [])
            return {"name": target.name, "versions": [str(number) for number in versions], "platform": PLATFORM,
                    "inputs": tensor_metadata(signature.inputs), "outputs": tensor_metadata(signature.outputs)}

    def infer(self, name: str, version: str, inputs: list[RequestInput], output_names: list[str] | None,
              deadline: float | None = None) -> tuple[Target, int, dict]:
        """(target, version number, output name -> array): every output, or those named, in order.

        `deadline` (time.monotonic()) lets the batcher drop a request whose client gave up.
        """
        with self.version(name, version) as (target, loaded, signature):
            feeds = self._feeds(target, signature, inputs)
            runner = None
            if self.batcher is not None:
                runner = functools.partial(self.batcher.run, deadline=deadline)
            _name, outputs = inference.predict_arrays(loaded, target.signature, feeds, self.max_request_elements,
                                                      runner, output_names or ())
            return target, loaded.version, outputs

    def _feeds(self, target: Target, signature, inputs: list[RequestInput]) -> dict:
        """name -> array, each input checked against the signature and the size limit before decoding."""
        feeds, remaining = {}, self.max_request_elements
        for tensor in inputs:
            if tensor.name in feeds:
                raise invalid_argument(f"input '{tensor.name}' is given more than once")
            info = signature.inputs.get(tensor.name)
            if info is None:
                raise invalid_argument(f"unexpected inference input '{tensor.name}' for model '{target.name}'; "
                                       f"its inputs are {sorted(signature.inputs)}")
            expected = datatype_of(info.dtype)
            if tensor.datatype != expected:
                raise invalid_argument(f"unexpected datatype {tensor.datatype} for inference input '{tensor.name}', "
                                       f"expecting {expected} for model '{target.name}'")
            _check_shape(target, tensor, info)
            try:
                count = tensors.checked_dims(tensor.shape, remaining)
                feeds[tensor.name] = tensor.decode(tensor.datatype, tensor.shape, count)
            except ServingError as error:
                raise invalid_argument(f"input '{tensor.name}': {error.message}") from None
            remaining -= count
        return feeds
