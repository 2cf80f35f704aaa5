"""TF Serving's REST API on a second port, plus the Prometheus metrics page.

Paths, JSON shapes, error JSON and HTTP codes follow TF Serving's http_rest_api_handler.cc
and json_tensor.cc: `:predict` (row `instances` -> `predictions`, columnar `inputs` ->
`outputs`), `:classify` / `:regress` (`results`), model status and metadata, and
`/monitoring/prometheus/metrics`. float32 values are written as their shortest round-trip
decimal, as TF Serving's WriteDecimal does.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import re
import threading
import time
import urllib.parse

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     input_pb2, model_pb2, predict_pb2, regression_pb2)

from serving import inference, prediction, tensors
from serving.tensors import ServingError, invalid_argument

LOG = logging.getLogger("serving.rest")
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
METRICS_PATH = "/monitoring/prometheus/metrics"
HTTP_CODES = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.CANCELLED: 499,
}


class RestApi:
    """The request logic behind the HTTP handler; returns (http status, body, content type)."""

    def __init__(self, manager, metrics, max_request_elements: int, batcher=None):
        self.manager = manager
        self.metrics = metrics
        self.max_request_elements = max_request_elements
        self.batcher = batcher

    def handle(self, method: str, raw_path: str, body: bytes | None):
        path = urllib.parse.urlsplit(raw_path).path
        if method == "GET" and path == METRICS_PATH:
            return 200, self.metrics.render().encode(), "text/plain; version=0.0.4"
        match = PREDICT_PATH.fullmatch(path)
        if method == "POST" and match:
            return self._inference(match, body)
        match = STATUS_PATH.fullmatch(path)
        if method == "GET" and match:
            return self._respond(lambda: self._status_or_metadata(match))
        if path.lower().startswith("/v1/"):
            return _error_reply(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: {method} {path}")
        return 404, _json_bytes({"error": f"Not found: {method} {path}"}), "application/json"

    def _inference(self, match, body: bytes):
        started = time.monotonic()
        name, version, label, verb = match.groups()
        name, verb = urllib.parse.unquote(name), verb.lower()
        status, payload, content_type = self._respond(
            lambda: self._run_inference(name, version, label, verb, body))
        code = next((c for c, h in HTTP_CODES.items() if h == status), grpc.StatusCode.INTERNAL)
        self.metrics.record(name, code.name, verb, "REST", (time.monotonic() - started) * 1e6)
        return status, payload, content_type

    @staticmethod
    def _respond(work):
        code, message, result = prediction.RequestRunner.run_work(work)
        if code != grpc.StatusCode.OK:
            return _error_reply(code, message)
        return 200, result.encode("utf-8"), "application/json"

    def _run_inference(self, name, version, label, verb, body: bytes) -> str:
        document = parse_json_body(body)
        spec = model_spec(name, version, label, document.get("signature_name", ""))
        loaded = self.manager.acquire(spec)
        try:
            if verb == "predict":
                return self._predict(loaded, spec, document)
            model_input = examples_input(document)
            if verb == "classify":
                _name, result = inference.classify_result(loaded, spec.signature_name, model_input)
                return json.dumps({"results": [[[c.label, c.score] for c in item.classes]
                                               for item in result.classifications]})
            _name, result = inference.regress_result(loaded, spec.signature_name, model_input)
            return json.dumps({"results": [item.value for item in result.regressions]})
        finally:
            loaded.release()

    def _predict(self, loaded, spec, document: dict) -> str:
        signature_name = spec.signature_name or inference.DEFAULT_SIGNATURE
        signature = loaded.signature_defs.get(signature_name)
        if signature is None:
            raise invalid_argument(f'Serving signature name: "{signature_name}" not found in signature def')
        row_format, feeds = json_feeds(document, signature)
        request = predict_pb2.PredictRequest(model_spec=spec)
        for alias, array in feeds.items():
            request.inputs[alias].CopyFrom(tensors.ndarray_to_proto(array, use_tensor_content=True))
        runner = self.batcher.run if self.batcher is not None else None
        response = inference.predict(loaded, request, self.max_request_elements, runner, tensor_content=True)
        outputs = {alias: tensors.proto_to_ndarray(proto, 2**62) for alias, proto in response.outputs.items()}
        return predictions_json(outputs, row_format)

    def _status_or_metadata(self, match) -> str:
        name, version, label, metadata = match.groups()
        if not name:
            raise invalid_argument("Missing model name in request.")
        name = urllib.parse.unquote(name)
        if metadata:
            return self._metadata(model_spec(name, version, label, ""))
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = parse_version(version)
        response = prediction.model_status(self.manager, request)
        return json_format.MessageToJson(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, spec) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
        loaded = self.manager.acquire(spec)
        try:
            response = inference.model_metadata(loaded, request)
        finally:
            loaded.release()
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        options = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        return json.dumps({
            "model_spec": json_format.MessageToDict(response.model_spec, **options),
            "metadata": {"signature_def": json_format.MessageToDict(signature_map, **options)},
        }, indent=2)


def _error_reply(code: grpc.StatusCode, message: str):
    status = HTTP_CODES.get(code, 500)
    return status, _json_bytes({"error": tensors.truncate_message(message)}), "application/json"


def _json_bytes(value) -> bytes:
    return json.dumps(value, indent=2).encode("utf-8")


def model_spec(name: str, version: str | None, label: str | None, signature_name) -> model_pb2.ModelSpec:
    if not isinstance(signature_name, str):
        raise invalid_argument("'signature_name' must be a string")
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    if version is not None:
        spec.version.value = parse_version(version)
    elif label is not None:
        spec.version_label = urllib.parse.unquote(label)
    return spec


def parse_version(text: str) -> int:
    """The int64 version in a URL, or INVALID_ARGUMENT as TF Serving's SimpleAtoi check.

    The length check comes first: Python refuses int() of strings over 4300 digits.
    """
    if len(text.lstrip("0")) > 19 or int(text) >= 2**63:
        raise invalid_argument(f"Failed to convert version: {text} to numeric.")
    return int(text)


def parse_json_body(body: bytes | None) -> dict:
    # The messages name the problem and its offset, not Python's codec or recursion internals.
    try:
        document = json.loads(body or b"")
    except UnicodeDecodeError as error:
        raise invalid_argument(f"JSON Parse error: invalid UTF-8 at offset: {error.start}") from None
    except json.JSONDecodeError as error:
        raise invalid_argument(f"JSON Parse error: {error.msg} at offset: {error.pos}") from None
    except (ValueError, RecursionError):
        raise invalid_argument("JSON Parse error: malformed, nested too deeply or a number too long") from None
    if not isinstance(document, dict):
        raise invalid_argument("JSON Value: request body is not an object")
    return document


# ---------------- JSON -> tensors ----------------
def json_feeds(document: dict, signature) -> tuple[bool, dict]:
    """(row_format, alias -> array) from a predict body, typed by the signature's dtypes."""
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances == has_inputs:
        raise invalid_argument(
            "JSON Value: request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    aliases = sorted(signature.inputs)
    if has_instances:
        instances = document["instances"]
        if not isinstance(instances, list) or not instances:
            raise invalid_argument("'instances' must be a non-empty JSON list")
        if len(aliases) == 1 and not _is_named_object(instances[0]):
            return True, {aliases[0]: json_to_array(instances, signature.inputs[aliases[0]].dtype, aliases[0])}
        columns: dict[str, list] = {}
        for index, instance in enumerate(instances):
            if not _is_named_object(instance):
                raise invalid_argument(f"Expecting object but got {_json_type(instance)} at item {index} "
                                       "of input list")
            for key, value in instance.items():
                columns.setdefault(key, []).append(value)
        lengths = {len(values) for values in columns.values()}
        if lengths != {len(instances)}:
            raise invalid_argument("Failed to process element: every instance must have the same named inputs")
        return True, _typed_columns(columns, signature)
    inputs = document["inputs"]
    if _is_named_object(inputs):
        return False, _typed_columns(inputs, signature)
    if len(aliases) != 1:
        raise invalid_argument("'inputs' must be an object of named tensors for a signature with several inputs")
    return False, {aliases[0]: json_to_array(inputs, signature.inputs[aliases[0]].dtype, aliases[0])}


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"), (int, "number"),
             (float, "number"))
    return next((name for kind, name in names if isinstance(value, kind)), "null")


def _json_preview(value) -> str:
    """The start of a value's JSON text for an error message.

    Cheap for huge values, and safe for deeply nested ones, whose json.dumps would raise
    RecursionError and turn a client mistake into a 500.
    """
    if isinstance(value, str):
        value = value[:100]
    elif isinstance(value, (dict, list)) and len(value) > 10:
        return f"(a {_json_type(value)} of {len(value)} items)"
    try:
        return json.dumps(value)[:100]
    except (RecursionError, ValueError):
        return f"(a deeply nested {_json_type(value)})"


def _is_named_object(value) -> bool:
    return isinstance(value, dict) and set(value) != {"b64"}


def _typed_columns(columns: dict, signature) -> dict:
    feeds = {}
    for alias, value in columns.items():
        # An alias the signature lacks is passed on so Predict reports it with its usual message.
        dtype = signature.inputs[alias].dtype if alias in signature.inputs else types_pb2.DT_FLOAT
        feeds[alias] = json_to_array(value, dtype, alias)
    return feeds


def json_to_array(value, dtype_enum: int, alias: str) -> np.ndarray:
    np_dtype = tensors.numpy_dtype(dtype_enum)
    try:
        if dtype_enum == types_pb2.DT_STRING:
            leaves = _map_leaves(value, lambda leaf: _string_leaf(leaf, alias))
            array = np.array(leaves, dtype=object)
            if array.dtype != object or any(not isinstance(v, bytes) for v in array.reshape(-1)):
                raise ValueError("ragged")
            return array
        _check_numeric_leaves(value, dtype_enum, alias)
        return np.array(value, dtype=np_dtype)
    except OverflowError:
        raise invalid_argument(f"Failed to process element: {alias}: a value is out of range for "
                               f"{tensors.dtype_name(dtype_enum)}") from None
    except (ValueError, TypeError):
        raise invalid_argument(
            f"Failed to process element: {alias}: expected a rectangular list of "
            f"{tensors.dtype_name(dtype_enum)} values") from None
    except RecursionError:
        raise invalid_argument(f"Failed to process element: {alias}: nested too deeply") from None


def _map_leaves(value, convert):
    if isinstance(value, list):
        return [_map_leaves(item, convert) for item in value]
    return convert(value)


def _string_leaf(leaf, alias: str) -> bytes:
    if isinstance(leaf, str):
        return leaf.encode("utf-8")
    if isinstance(leaf, dict) and set(leaf) == {"b64"} and isinstance(leaf["b64"], str):
        try:
            return base64.b64decode(leaf["b64"], validate=True)
        except ValueError:
            raise invalid_argument(f"Unable to base64 decode value for {alias}") from None
    raise invalid_argument(f"JSON Value: {_json_preview(leaf)} Type: not a string, is not of expected type: string")


def _check_numeric_leaves(value, dtype_enum: int, alias: str) -> None:
    if isinstance(value, list):
        for item in value:
            _check_numeric_leaves(item, dtype_enum, alias)
        return
    is_bool = isinstance(value, bool)
    if dtype_enum == types_pb2.DT_BOOL:
        ok = is_bool
    elif dtype_enum in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        ok = isinstance(value, (int, float)) and not is_bool
    else:
        ok = isinstance(value, int) and not is_bool
    if not ok:
        expected = tensors.dtype_name(dtype_enum)[3:].lower()
        raise invalid_argument(f"JSON Value: {_json_preview(value)} is not of expected type: {expected}")


def examples_input(document: dict) -> input_pb2.Input:
    examples = document.get("examples")
    if not isinstance(examples, list):
        raise invalid_argument("'examples' must be a JSON list of objects")
    model_input = input_pb2.Input()
    if "context" in document:
        with_context = model_input.example_list_with_context
        with_context.context.CopyFrom(json_example(document["context"]))
        target = with_context.examples
    else:
        target = model_input.example_list.examples
    for item in examples:
        target.add().CopyFrom(json_example(item))
    return model_input


def json_example(item) -> example_pb2.Example:
    if not isinstance(item, dict):
        raise invalid_argument("Each example must be a JSON object of features")
    example = example_pb2.Example()
    for name, value in item.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[name]
        _fill_feature(feature, values, name)
    return example


def _fill_feature(feature: feature_pb2.Feature, values: list, name: str) -> None:
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        feature.int64_list.value.extend(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        feature.float_list.value.extend(float(v) for v in values)
    elif all(isinstance(v, (str, dict)) for v in values):
        feature.bytes_list.value.extend(_string_leaf(v, name) for v in values)
    else:
        raise invalid_argument(f"Feature {name} must be a list of numbers or strings")


# ---------------- tensors -> JSON ----------------
def predictions_json(outputs: dict, row_format: bool) -> str:
    aliases = sorted(outputs)
    if row_format:
        if len(aliases) == 1:
            return '{"predictions": ' + array_json(outputs[aliases[0]], aliases[0]) + "}"
        sizes = {outputs[a].shape[0] if outputs[a].ndim else None for a in aliases}
        if len(sizes) != 1 or None in sizes:
            raise invalid_argument("Output tensors must have the same 0th dimension for row format")
        rows = []
        for index in range(sizes.pop()):
            fields = [json.dumps(a) + ": " + array_json(outputs[a][index], a) for a in aliases]
            rows.append("{" + ", ".join(fields) + "}")
        return '{"predictions": [' + ", ".join(rows) + "]}"
    if len(aliases) == 1:
        return '{"outputs": ' + array_json(outputs[aliases[0]], aliases[0]) + "}"
    fields = [json.dumps(a) + ": " + array_json(outputs[a], a) for a in aliases]
    return '{"outputs": {' + ", ".join(fields) + "}}"


def array_json(array: np.ndarray, alias: str) -> str:
    """Nested JSON list text for an array (a bare value for a scalar)."""
    array = np.asarray(array)
    if array.size == 0:
        return json.dumps(np.zeros(array.shape).tolist())
    leaf = _leaf_writer(array.dtype, alias)
    texts = [leaf(value) for value in array.reshape(-1)]
    for size in reversed(array.shape):
        texts = ["[" + ",".join(texts[i:i + size]) + "]" for i in range(0, len(texts), size)]
    return texts[0]


def _leaf_writer(dtype: np.dtype, alias: str):
    if dtype == object or dtype.kind == "S":
        return lambda value: _bytes_text(tensors._as_bytes(value), alias.endswith("_bytes"))
    if dtype == np.bool_:
        return lambda value: "true" if value else "false"
    if dtype.kind in "iu":
        return lambda value: str(int(value))
    if dtype.kind == "f":
        return _float_text
    return lambda value: json.dumps(str(value))


def _float_text(value) -> str:
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    # numpy's str() of a float32/float16 scalar is the shortest round-trip repr.
    return str(value) if value.dtype != np.float64 else repr(float(value))


def _bytes_text(value: bytes, force_base64: bool) -> str:
    if not force_base64:
        try:
            return json.dumps(value.decode("utf-8"))
        except UnicodeDecodeError:
            pass  # not text: send base64 rather than invalid JSON
    return '{"b64": "' + base64.b64encode(value).decode("ascii") + '"}'


# ---------------- HTTP plumbing ----------------
class _Handler(http.server.BaseHTTPRequestHandler):
    api: RestApi
    max_body_bytes: int
    post_slots: threading.BoundedSemaphore  # one per inference POST allowed to run at once
    max_concurrent_posts: int
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._dispatch("GET", None)

    def do_POST(self):
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            return self._send(400, _json_bytes({"error": "Invalid Content-Length header"}), "application/json")
        if length > self.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as a request
            return self._send(413, _json_bytes({"error": f"Request body of {length} bytes exceeds the limit "
                                                         f"of {self.max_body_bytes} bytes"}), "application/json")
        # Take a slot before reading the body, so refused requests never buffer theirs.
        if not self.post_slots.acquire(blocking=False):
            return self._refuse_busy(length)
        try:
            self._dispatch("POST", self.rfile.read(length))
        finally:
            self.post_slots.release()

    def _refuse_busy(self, length: int) -> None:
        """429 without queueing; the body is read and dropped so the connection stays usable."""
        self._drain(length)
        message = f"Concurrent REST request limit of {self.max_concurrent_posts} exceeded, retry later"
        self._send(429, _json_bytes({"error": message}), "application/json")

    def _drain(self, length: int) -> None:
        """Read and drop a body we will not use: closing a socket with unread data resets the
        connection, and the client may then lose our reply."""
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, unsupported method, ...)
        as JSON, like every other reply, instead of its HTML page.

        An unsupported method (PUT, DELETE, ...) gets TF Serving's 400 "Malformed request".
        """
        if code == 501 and self.command:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if 0 < length <= self.max_body_bytes:
                self._drain(length)
            code = 400
            message = f"Malformed request: {self.command} {urllib.parse.urlsplit(self.path).path}"
        self.close_connection = True
        text = message or self.responses.get(code, ("Error",))[0]
        self._send(code, _json_bytes({"error": text}), "application/json")

    def _dispatch(self, method: str, body):
        try:
            status, payload, content_type = self.api.handle(method, self.path, body)
        except Exception:
            LOG.exception("unexpected REST error")
            status, payload, content_type = 500, _json_bytes({"error": "internal error"}), "application/json"
        self._send(status, payload, content_type)

    def _send(self, status: int, payload: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):  # route access logs to logging, not stderr
        LOG.debug("%s - %s", self.address_string(), format % args)


class RestServer:
    """A ThreadingHTTPServer serving RestApi on host:port (port 0 picks a free one).

    At most `max_concurrent_posts` POSTs run at once; more get HTTP 429 at once (the REST
    twin of gRPC's maximum_concurrent_rpcs) rather than all competing for the CPU.
    """

    def __init__(self, api: RestApi, host: str, port: int, max_body_bytes: int,
                 max_concurrent_posts: int = 256):
        handler = type("RestHandler", (_Handler,), {
            "api": api, "max_body_bytes": max_body_bytes, "max_concurrent_posts": max_concurrent_posts,
            "post_slots": threading.BoundedSemaphore(max_concurrent_posts)})
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
