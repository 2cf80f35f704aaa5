"""TensorProto <-> numpy conversion for the model server, with limits checked first.

Requests are parsed without `tf.make_ndarray`, because that pads a tiny proto up to its
declared shape (a 27-byte proto can become a 31 MB array). Here dtype, rank, every dim, the
declared element count and the payload length are checked before any array is built.
Responses use TF Serving's default typed `*_val` fields (`tensor_content` on request: the
benches compare the two). REST never builds TensorProtos: see inference.predict_arrays.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.errors import ServingError, invalid_argument

MAX_RANK = 254  # TensorShape::MaxDimensions() in TF


def _bfloat16_dtype():
    try:
        import ml_dtypes  # shipped with TensorFlow
        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover - TF always ships ml_dtypes
        return None


# DataType -> (numpy dtype, typed value field). Half types keep their bits in half_val.
DTYPES: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_STRING: (np.dtype(object), "string_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),
    types_pb2.DT_COMPLEX64: (np.dtype(np.complex64), "scomplex_val"),
    types_pb2.DT_COMPLEX128: (np.dtype(np.complex128), "dcomplex_val"),
}
if _bfloat16_dtype() is not None:
    DTYPES[types_pb2.DT_BFLOAT16] = (_bfloat16_dtype(), "half_val")

# Integer types stored in a wider proto field are narrowed like a C++ static_cast.
_WIDE_FIELD_DTYPE = {"int_val": np.int32, "int64_val": np.int64, "uint32_val": np.uint32,
                     "uint64_val": np.uint64}


# Packed float_val/double_val payloads are the array's little-endian bytes: a few bulk copies
# instead of one Python float per element, still read as float_val (timings: bench/README.md).
_PACKED_FIXED_WIDTH = {
    types_pb2.DT_FLOAT: (tensor_pb2.TensorProto.FLOAT_VAL_FIELD_NUMBER, np.dtype("<f4")),
    types_pb2.DT_DOUBLE: (tensor_pb2.TensorProto.DOUBLE_VAL_FIELD_NUMBER, np.dtype("<f8")),
}
_LENGTH_DELIMITED = 2  # protobuf wire type of packed repeated fields


def dtype_name(dtype_enum: int) -> str:
    """'DT_FLOAT' style name of a DataType enum value (or the number if unknown)."""
    try:
        return types_pb2.DataType.Name(dtype_enum)
    except ValueError:
        return str(dtype_enum)


def numpy_dtype(dtype_enum: int) -> np.dtype:
    """The numpy dtype for a DataType, raising INVALID_ARGUMENT for unsupported types."""
    if dtype_enum not in DTYPES:
        raise invalid_argument(f"unsupported tensor dtype {dtype_name(dtype_enum)}")
    return DTYPES[dtype_enum][0]


def checked_shape(proto: tensor_pb2.TensorProto, max_elements: int) -> tuple[tuple[int, ...], int]:
    """Validate the declared shape and return it with its element count."""
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument("tensor shape has unknown rank")
    dims = tuple(dim.size for dim in proto.tensor_shape.dim)
    return dims, checked_dims(dims, max_elements)


def checked_dims(dims: tuple[int, ...], max_elements: int) -> int:
    """The element count of a request tensor's shape, or INVALID_ARGUMENT when the shape is too
    deep, negative, too large or over `max_elements` (the same checks for every protocol)."""
    if len(dims) > MAX_RANK:
        raise invalid_argument(f"tensor rank {len(dims)} exceeds the maximum of {MAX_RANK}")
    for size in dims:
        if size < 0:
            raise invalid_argument(f"tensor shape {list(dims)} has a negative dimension")
    # Python ints cannot overflow, so a shape like [2**62, 2**62] is caught here. Like TF,
    # refuse shapes whose non-zero dims overflow int64 even when a zero dim makes them empty.
    # (numpy also needs the byte size, at up to 16 bytes an element, to fit in int64.)
    if math.prod(size for size in dims if size) >= 2**58:
        raise invalid_argument(f"tensor shape {list(dims)} is too large")
    elements = math.prod(dims)
    if elements > max_elements:
        raise invalid_argument(too_many_elements(dims, elements, max_elements))
    return elements


def too_many_elements(dims, elements: int, max_elements: int) -> str:
    """The message for a tensor over the request's element limit (protos and REST arrays alike)."""
    return f"tensor shape {list(dims)} has {elements} elements, more than the limit of {max_elements}"


def proto_to_ndarray(proto: tensor_pb2.TensorProto, max_elements: int) -> np.ndarray:
    """Build a numpy array from a request TensorProto, or raise ServingError INVALID_ARGUMENT.

    Nothing larger than `max_elements` elements is ever allocated. When the `*_val` field
    has fewer values than elements, the last value is repeated (TF's Tensor::FromProto).
    """
    dtype = numpy_dtype(proto.dtype)
    shape, elements = checked_shape(proto, max_elements)
    if proto.tensor_content:
        return _from_tensor_content(proto, dtype, shape, elements)
    return _from_typed_values(proto, dtype, shape, elements)


def _from_tensor_content(proto, dtype: np.dtype, shape, elements: int) -> np.ndarray:
    if proto.dtype == types_pb2.DT_STRING:
        raise invalid_argument("string tensors cannot use tensor_content")
    expected = elements * dtype.itemsize
    if len(proto.tensor_content) != expected:
        raise invalid_argument(
            f"tensor_content has {len(proto.tensor_content)} bytes but shape {list(shape)} of "
            f"{dtype_name(proto.dtype)} needs {expected}")
    return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)


def _from_typed_values(proto, dtype: np.dtype, shape, elements: int) -> np.ndarray:
    field = DTYPES[proto.dtype][1]
    values = getattr(proto, field)
    count = len(values)
    if field in ("scomplex_val", "dcomplex_val"):
        count //= 2  # real and imaginary parts alternate
    if count > elements:
        raise invalid_argument(
            f"{field} has {count} values but shape {list(shape)} holds only {elements}")
    flat = _decode_values(proto.dtype, field, values, dtype)
    if count == elements:
        return flat.reshape(shape)
    if count == 0:
        # Tensor::FromProto fills a tensor without values with zeros (bounded by the limit).
        return np.zeros(shape, dtype=dtype) if dtype != object else np.full(shape, b"", dtype=object)
    padded = np.empty(elements, dtype=dtype)
    padded[:count] = flat
    padded[count:] = flat[-1]
    return padded.reshape(shape)


def _decode_values(dtype_enum: int, field: str, values, dtype: np.dtype) -> np.ndarray:
    if field == "string_val":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array
    if field == "half_val":
        bits = np.array(values, dtype=np.int64).astype(np.uint16)
        return bits.view(dtype)
    if field in ("scomplex_val", "dcomplex_val"):
        parts = np.array(values, dtype=np.float64)[: 2 * (len(values) // 2)]
        return (parts[0::2] + 1j * parts[1::2]).astype(dtype)
    if field in _WIDE_FIELD_DTYPE:
        return np.array(values, dtype=_WIDE_FIELD_DTYPE[field]).astype(dtype)
    return np.array(values, dtype=dtype)


def dtype_enum_of(array: np.ndarray) -> int:
    """The DataType enum for a numpy array's dtype."""
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        return types_pb2.DT_STRING
    for dtype_enum, (dtype, _field) in DTYPES.items():
        if dtype == array.dtype and dtype != object:
            return dtype_enum
    raise ServingError(grpc.StatusCode.INTERNAL, f"cannot encode numpy dtype {array.dtype}")


def ndarray_to_proto(array: np.ndarray, use_tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """Encode an output array as TF Serving does: typed `*_val` fields, or tensor_content."""
    array = np.asarray(array)
    dtype_enum = dtype_enum_of(array)
    proto = tensor_pb2.TensorProto(dtype=dtype_enum)
    proto.tensor_shape.CopyFrom(shape_proto(array.shape))
    flat = array.reshape(-1)
    if dtype_enum == types_pb2.DT_STRING:
        proto.string_val.extend(as_bytes(value) for value in flat)
        return proto
    if use_tensor_content:
        proto.tensor_content = np.ascontiguousarray(flat).tobytes()
        return proto
    if dtype_enum in _PACKED_FIXED_WIDTH:
        field_number, wire_dtype = _PACKED_FIXED_WIDTH[dtype_enum]
        payload = flat.astype(wire_dtype, copy=False).tobytes()
        key = _varint(field_number << 3 | _LENGTH_DELIMITED)
        proto.MergeFromString(key + _varint(len(payload)) + payload)
        return proto
    field = DTYPES[dtype_enum][1]
    if field == "half_val":
        getattr(proto, field).extend(flat.view(np.uint16).astype(np.int32).tolist())
    elif field in ("scomplex_val", "dcomplex_val"):
        pairs = np.stack([flat.real, flat.imag], axis=-1).reshape(-1)
        getattr(proto, field).extend(pairs.tolist())
    else:
        getattr(proto, field).extend(flat.tolist())
    return proto


def shape_proto(shape) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(size)) for size in shape])


def as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)
