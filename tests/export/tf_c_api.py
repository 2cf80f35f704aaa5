"""Loads a SavedModel through TensorFlow's C API (ctypes) and runs its signatures: the C++ path.

`TF_LoadSessionFromSavedModel` is the C wrapper of the C++ `LoadSavedModel` that
`tensorflow_model_server` calls: it builds a graph from the MetaGraphDef tagged `serve`, restores the
variables by running the bundle's saver (a TF1 restore, as TF Serving does), and returns a session.
The C API lives in the shared libraries of the tensorflow wheel (`libtensorflow_cc.so.2`, with the
tensor functions in `libtensorflow_framework.so.2`), so no separate libtensorflow is needed.

Signatures are run by tensor name, as TF Serving runs them: each signature's inputs and outputs are
looked up in the `signature_def` of the MetaGraphDef the loader returned.

Only what the digitgan signatures use is supported: float32/int32/int64 inputs, float32 and string
outputs. It runs inside the test process: the libraries are the ones Python TensorFlow has already
loaded (dlopen returns the same handles), and the C API session is independent of the eager
runtime, so nothing conflicts (tried: outputs equal `tf.saved_model.load`'s bit for bit).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

TF_FLOAT, TF_INT32, TF_STRING, TF_INT64 = 1, 3, 7, 9  # tensorflow/c/tf_datatype.h
DATA_TYPES = {np.dtype(np.float32): TF_FLOAT, np.dtype(np.int32): TF_INT32, np.dtype(np.int64): TF_INT64}
NUMPY_TYPES = {code: dtype for dtype, code in DATA_TYPES.items()}
TSTRING_BYTES = 24  # sizeof(TF_TString), tsl/platform/ctstring_internal.h


class TFError(RuntimeError):
    """A C API call failed; the message is TF_Message's, prefixed with the TF_Code number."""

    def __init__(self, code: int, message: str):
        super().__init__(f"TF error code {code}: {message}")
        self.code = code


class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("data_deallocator", ctypes.c_void_p)]


class _Output(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


def load_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libtensorflow_cc, libtensorflow_framework) with the argument and result types declared."""
    directory = Path(tf.sysconfig.get_lib())  # site-packages/tensorflow
    framework = ctypes.CDLL(str(directory / "libtensorflow_framework.so.2"), mode=ctypes.RTLD_GLOBAL)
    session_library = ctypes.CDLL(str(directory / "libtensorflow_cc.so.2"), mode=ctypes.RTLD_GLOBAL)
    pointer, size, integer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    declarations = {
        framework: {
            "TF_NewStatus": (pointer, []), "TF_DeleteStatus": (None, [pointer]),
            "TF_GetCode": (integer, [pointer]), "TF_Message": (ctypes.c_char_p, [pointer]),
            "TF_NewBuffer": (ctypes.POINTER(_Buffer), []), "TF_DeleteBuffer": (None, [ctypes.POINTER(_Buffer)]),
            "TF_AllocateTensor": (pointer, [integer, ctypes.POINTER(ctypes.c_int64), integer, size]),
            "TF_DeleteTensor": (None, [pointer]), "TF_TensorData": (pointer, [pointer]),
            "TF_TensorByteSize": (size, [pointer]), "TF_TensorType": (integer, [pointer]),
            "TF_NumDims": (integer, [pointer]), "TF_Dim": (ctypes.c_int64, [pointer, integer]),
        },
        session_library: {
            "TF_NewGraph": (pointer, []), "TF_DeleteGraph": (None, [pointer]),
            "TF_NewSessionOptions": (pointer, []), "TF_DeleteSessionOptions": (None, [pointer]),
            "TF_LoadSessionFromSavedModel": (pointer, [pointer, pointer, ctypes.c_char_p,
                                                       ctypes.POINTER(ctypes.c_char_p), integer, pointer,
                                                       ctypes.POINTER(_Buffer), pointer]),
            "TF_GraphOperationByName": (pointer, [pointer, ctypes.c_char_p]),
            "TF_SessionRun": (None, [pointer, pointer, ctypes.POINTER(_Output), ctypes.POINTER(pointer), integer,
                                     ctypes.POINTER(_Output), ctypes.POINTER(pointer), integer,
                                     ctypes.POINTER(pointer), integer, pointer, pointer]),
            "TF_CloseSession": (None, [pointer, pointer]), "TF_DeleteSession": (None, [pointer, pointer]),
        },
    }
    for library, functions in declarations.items():
        for name, (result, arguments) in functions.items():
            function = getattr(library, name)
            function.restype, function.argtypes = result, arguments
    return session_library, framework


class SavedModelSession:
    """A SavedModel loaded by `TF_LoadSessionFromSavedModel` (tag `serve`); `run` one signature at a time."""

    def __init__(self, path: str, tags: tuple[str, ...] = ("serve",)):
        self._c, self._framework = load_libraries()
        self._status = self._framework.TF_NewStatus()
        self._graph = self._c.TF_NewGraph()
        options = self._c.TF_NewSessionOptions()
        meta_graph_buffer = self._framework.TF_NewBuffer()
        tag_array = (ctypes.c_char_p * len(tags))(*[tag.encode() for tag in tags])
        try:
            self._session = self._c.TF_LoadSessionFromSavedModel(options, None, path.encode(), tag_array, len(tags),
                                                                 self._graph, meta_graph_buffer, self._status)
            self._check()
            serialized = ctypes.string_at(meta_graph_buffer.contents.data, meta_graph_buffer.contents.length)
            self.meta_graph = meta_graph_pb2.MetaGraphDef.FromString(serialized)
        finally:
            self._framework.TF_DeleteBuffer(meta_graph_buffer)
            self._c.TF_DeleteSessionOptions(options)

    def _check(self) -> None:
        code = self._framework.TF_GetCode(self._status)
        if code != 0:
            raise TFError(code, self._framework.TF_Message(self._status).decode(errors="replace"))

    def _output(self, tensor_name: str) -> _Output:
        operation_name, _, index = tensor_name.partition(":")
        operation = self._c.TF_GraphOperationByName(self._graph, operation_name.encode())
        if not operation:
            raise KeyError(f"no operation {operation_name!r} in the loaded graph")
        return _Output(operation, int(index or 0))

    def run(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds `inputs` (by alias) to the signature's tensors and fetches every output (by alias).

        Float and integer outputs come back as numpy arrays; string outputs as object arrays of bytes.
        """
        signature = self.meta_graph.signature_def[signature_name]
        feeds = [(self._output(signature.inputs[alias].name), _to_tensor(self._framework, np.asarray(value)))
                 for alias, value in inputs.items()]
        aliases = sorted(signature.outputs)
        fetches = (_Output * len(aliases))(*[self._output(signature.outputs[alias].name) for alias in aliases])
        results = (ctypes.c_void_p * len(aliases))()
        try:
            self._c.TF_SessionRun(self._session, None, (_Output * len(feeds))(*[feed for feed, _ in feeds]),
                                  (ctypes.c_void_p * len(feeds))(*[tensor for _, tensor in feeds]), len(feeds),
                                  fetches, results, len(aliases), None, 0, None, self._status)
            self._check()
            return {alias: _from_tensor(self._framework, results[i]) for i, alias in enumerate(aliases)}
        finally:
            for _, tensor in feeds:
                self._framework.TF_DeleteTensor(tensor)
            for tensor in results:
                if tensor:
                    self._framework.TF_DeleteTensor(tensor)

    def close(self) -> None:
        self._c.TF_CloseSession(self._session, self._status)
        self._c.TF_DeleteSession(self._session, self._status)
        self._c.TF_DeleteGraph(self._graph)
        self._framework.TF_DeleteStatus(self._status)

    def __enter__(self) -> "SavedModelSession":
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def _to_tensor(framework: ctypes.CDLL, array: np.ndarray) -> int:
    """A new TF_Tensor holding a copy of `array` (float32, int32 or int64)."""
    if array.dtype not in DATA_TYPES:
        raise TypeError(f"unsupported input dtype {array.dtype}")
    array = np.ascontiguousarray(array)
    dims = (ctypes.c_int64 * array.ndim)(*array.shape)
    tensor = framework.TF_AllocateTensor(DATA_TYPES[array.dtype], dims, array.ndim, array.nbytes)
    ctypes.memmove(framework.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
    return tensor


def _from_tensor(framework: ctypes.CDLL, tensor: int) -> np.ndarray:
    """A numpy copy of a TF_Tensor: numeric dtypes as they are, DT_STRING as an object array of bytes."""
    shape = tuple(framework.TF_Dim(tensor, axis) for axis in range(framework.TF_NumDims(tensor)))
    data_type, data = framework.TF_TensorType(tensor), framework.TF_TensorData(tensor)
    if data_type == TF_STRING:
        count = int(np.prod(shape, dtype=np.int64))
        values = [_read_tstring(data + i * TSTRING_BYTES) for i in range(count)]
        return np.array(values, dtype=object).reshape(shape)
    if data_type not in NUMPY_TYPES:
        raise TypeError(f"unsupported output TF_DataType {data_type}")
    size = framework.TF_TensorByteSize(tensor)
    return np.frombuffer(ctypes.string_at(data, size), NUMPY_TYPES[data_type]).reshape(shape).copy()


def _read_tstring(address: int) -> bytes:
    """The bytes of one TF_TString (little-endian layout of tsl/platform/ctstring_internal.h).

    The two low bits of the first byte give the type: SMALL keeps size << 2 in that byte and the
    characters after it; LARGE and VIEW keep size << 2 in a size_t followed by a pointer (LARGE has
    the capacity in between); OFFSET keeps a uint32 size << 2 and a uint32 offset from the string.
    """
    raw = ctypes.string_at(address, TSTRING_BYTES)
    kind = raw[0] & 0x03
    if kind == 0:  # SMALL
        return raw[1:1 + (raw[0] >> 2)]
    if kind == 1:  # LARGE: size, capacity, pointer
        size, _, pointer = np.frombuffer(raw, np.uint64)
        return ctypes.string_at(int(pointer), int(size) >> 2)
    if kind == 2:  # OFFSET
        size, offset = np.frombuffer(raw[:8], np.uint32)
        return ctypes.string_at(address + int(offset), int(size) >> 2)
    size, pointer, _ = np.frombuffer(raw, np.uint64)  # VIEW: size, pointer, owner
    return ctypes.string_at(int(pointer), int(size) >> 2)
