"""TF Serving's REST API on a second port, plus the Prometheus metrics page.

Paths, JSON shapes, error JSON and HTTP codes follow TF Serving's http_rest_api_handler.cc,
http_server.cc and json_tensor.cc: `:predict` (row `instances` -> `predictions`, columnar
`inputs` -> `outputs`), `:classify` / `:regress` (`results`), model status and metadata, and the
Prometheus page when a monitoring config enables it. Values are written as json_tensor.cc writes
them: floats by WriteDecimal (six significant digits when they read back to the same value,
else 9 for float32 and 17 for float64, whole numbers with ".0"), DT_STRING outputs whose alias
ends in `_bytes` as `{"b64": ...}` and every other string as a raw JSON string (its bytes as
they are, invalid UTF-8 included, as rapidjson writes them). Request bodies may be gzip
(`Content-Encoding`) or chunked (`Transfer-Encoding`), and `{"b64": ...}` inputs are decoded
as leniently as absl::Base64Unescape.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
import zlib
from fractions import Fraction

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
HTTP_CODES = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.CANCELLED: 499,
}


class RestApi:
    """The request logic behind the HTTP handler; returns (http status, body, content type).

    Every request under `/v1/` is counted in request_count with the gRPC code it ended with
    (status and metadata GETs and malformed requests too), as TF Serving's REST dispatcher does;
    the model name is the one in the path ("" when the path names none).
    """

    def __init__(self, manager, metrics, max_request_elements: int, batcher=None,
                 prometheus_path: str | None = None):
        self.manager = manager
        self.metrics = metrics
        self.max_request_elements = max_request_elements
        self.batcher = batcher
        self.prometheus_path = prometheus_path  # None: no metrics page, as TF without a monitoring config

    def handle(self, method: str, raw_path: str, body: bytes | None):
        path = urllib.parse.urlsplit(raw_path).path
        if self.prometheus_path is not None and path == self.prometheus_path:
            return 200, self.metrics.render().encode(), "text/plain"
        if not _is_api_path(path):
            return 404, _json_bytes({"error": f"Not found: {method} {path}"}), "application/json"
        started = time.monotonic()
        model_name, api, code, reply = self._route(method, path, body)
        self.metrics.record(model_name, code.name, api, "REST", (time.monotonic() - started) * 1e6)
        return reply

    def refuse(self, method: str, raw_path: str, code: grpc.StatusCode, message: str,
               http_status: int | None = None):
        """The reply to a request the HTTP layer turned away (body too large, bad gzip, ...),
        counted like any other request under /v1/."""
        path = urllib.parse.urlsplit(raw_path).path
        if _is_api_path(path):
            model_name, api = _model_and_api(method, path)
            self.metrics.record(model_name, code.name, api, "REST", 0.0)
        status, payload, content_type = _error_reply(code, message)
        return http_status or status, payload, content_type

    def _route(self, method: str, path: str, body: bytes | None):
        """(model name, API label, gRPC code, reply) of a request under /v1/."""
        model_name, api = _model_and_api(method, path)
        match = PREDICT_PATH.fullmatch(path)
        if method == "POST" and match:
            _name, version, label, _verb = match.groups()
            code, reply = self._respond(lambda: self._run_inference(model_name, version, label, api, body))
            return model_name, api, code, reply
        match = STATUS_PATH.fullmatch(path)
        if method == "GET" and match:
            code, reply = self._respond(lambda: self._status_or_metadata(match))
            return model_name, api, code, reply
        code = grpc.StatusCode.INVALID_ARGUMENT
        return model_name, api, code, _error_reply(code, f"Malformed request: {method} {path}")

    @staticmethod
    def _respond(work):
        """(gRPC code, reply) of work(); the code is the real one, not one read back from HTTP."""
        code, message, result = prediction.RequestRunner.run_work(work)
        if code != grpc.StatusCode.OK:
            return code, _error_reply(code, message)
        # surrogateescape: raw string outputs carry bytes that are not UTF-8 (see _string_text).
        return code, (200, result.encode("utf-8", "surrogateescape"), "application/json")

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
                return classify_json(result)
            _name, result = inference.regress_result(loaded, spec.signature_name, model_input)
            values = float_texts(np.array([item.value for item in result.regressions], np.float32))
            return '{"results": [' + ", ".join(values) + "]}"
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


def _is_api_path(path: str) -> bool:
    """TF Serving's REST dispatcher takes every path matching (?i)/v1/.*"""
    return path.lower().startswith("/v1/")


def _model_and_api(method: str, path: str) -> tuple[str, str]:
    """The model name and API label TF Serving's ParseModelInfo reads from a request path.

    The API is the lower-case verb of a predict/classify/regress POST and "" otherwise; the name
    is URL-decoded, and "" when the path does not match the method's pattern.
    """
    if method == "POST":
        match = PREDICT_PATH.fullmatch(path)
        if match:
            return urllib.parse.unquote(match.group(1)), match.group(4).lower()
    elif method == "GET":
        match = STATUS_PATH.fullmatch(path)
        if match and match.group(1):
            return urllib.parse.unquote(match.group(1)), ""
    return "", ""


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
                if key not in signature.inputs:
                    raise invalid_argument(f"Failed to process element: {index} key: {key} of 'instances' "
                                           f"list. Error: JSON object: does not have named input: {key}")
                columns.setdefault(key, []).append(value)
            if set(instance) != set(aliases):
                raise invalid_argument(f"Failed to process element: {index} of 'instances' list. JSON object: "
                                       f"{_json_preview(instance)} keys must be equal to: {','.join(aliases)}")
        return True, _typed_columns(columns, signature)
    inputs = document["inputs"]
    if _is_named_object(inputs):
        # TF looks up each signature input and ignores any other key (FillTensorMapFromInputsMap).
        missing = [alias for alias in aliases if alias not in inputs]
        if missing:
            raise invalid_argument(f"Missing named input: {missing[0]} in 'inputs' object.")
        return False, _typed_columns({alias: inputs[alias] for alias in aliases}, signature)
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
    """alias -> array for columns whose aliases are all signature inputs."""
    return {alias: json_to_array(value, signature.inputs[alias].dtype, alias) for alias, value in columns.items()}


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
        decoded = base64_unescape(leaf["b64"])
        if decoded is None:
            raise invalid_argument(f"Unable to base64 decode value for {alias}")
        return decoded
    raise invalid_argument(f"JSON Value: {_json_preview(leaf)} Type: not a string, is not of expected type: string")


_ASCII_SPACE = {ord(character): None for character in " \t\n\v\f\r"}  # absl::ascii_isspace
_BASE64_DIGITS = re.compile(r"[A-Za-z0-9+/]*")
_PADDING_NEEDED = {0: 0, 2: 2, 3: 1}  # '=' that complete a final group of 4, 2 or 3 digits


def base64_unescape(text: str) -> bytes | None:
    """Bytes of base64 `text` as absl::Base64Unescape decodes them, or None where it fails.

    Like absl (escaping.cc Base64UnescapeInternal): ASCII whitespace anywhere is skipped, so
    the `base64` command's 76-column lines decode; padding may be left out, but when present
    it must complete the last group exactly ("AA==" or "AA", not "AA="); '.' pads like '=';
    only the standard alphabet counts (no '-' or '_'); nothing but padding and whitespace may
    follow the first pad; one lone digit in the last group fails; unused low bits are ignored.
    """
    compact = text.translate(_ASCII_SPACE)
    cut = min((index for index in (compact.find("="), compact.find(".")) if index >= 0), default=len(compact))
    digits, padding = compact[:cut], compact[cut:]
    if not _BASE64_DIGITS.fullmatch(digits) or padding.strip("=."):
        return None
    remainder = len(digits) % 4
    if remainder == 1 or (padding and len(padding) != _PADDING_NEEDED[remainder]):
        return None
    return base64.b64decode(digits + "=" * _PADDING_NEEDED[remainder])


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
    """The `predictions` (row) or `outputs` (columnar) document of MakeJsonFromTensors.

    The text may hold lone surrogates standing for raw bytes of string outputs; encode it
    with "surrogateescape" to get the bytes TF Serving would send.
    """
    aliases = sorted(outputs)
    if row_format:
        if len(aliases) == 1:
            return '{"predictions": ' + array_json(outputs[aliases[0]], aliases[0]) + "}"
        sizes = {outputs[a].shape[0] if outputs[a].ndim else None for a in aliases}
        if len(sizes) != 1 or None in sizes:
            raise invalid_argument("Output tensors must have the same 0th dimension for row format")
        rows = []
        for index in range(sizes.pop()):
            fields = [_string_text(a.encode()) + ": " + array_json(outputs[a][index], a) for a in aliases]
            rows.append("{" + ", ".join(fields) + "}")
        return '{"predictions": [' + ", ".join(rows) + "]}"
    if len(aliases) == 1:
        return '{"outputs": ' + array_json(outputs[aliases[0]], aliases[0]) + "}"
    fields = [_string_text(a.encode()) + ": " + array_json(outputs[a], a) for a in aliases]
    return '{"outputs": {' + ", ".join(fields) + "}}"


def classify_json(result) -> str:
    """MakeJsonFromClassificationResult: [[[label, score], ...], ...], scores by WriteDecimal."""
    items = []
    for item in result.classifications:
        scores = float_texts(np.array([c.score for c in item.classes], np.float32))
        pairs = ["[" + _string_text(c.label.encode()) + ", " + score + "]" for c, score in zip(item.classes, scores)]
        items.append("[" + ", ".join(pairs) + "]")
    return '{"results": [' + ", ".join(items) + "]}"


def array_json(array: np.ndarray, alias: str) -> str:
    """Nested JSON list text for an array (a bare value for a scalar)."""
    array = np.asarray(array)
    if array.size == 0:
        return json.dumps(np.zeros(array.shape).tolist())
    texts = _leaf_texts(array.reshape(-1), alias)
    for size in reversed(array.shape):
        texts = ["[" + ",".join(texts[i:i + size]) + "]" for i in range(0, len(texts), size)]
    return texts[0]


def _leaf_texts(flat: np.ndarray, alias: str) -> list[str]:
    """JSON text of each value of a 1-D array, as json_tensor.cc's AddSingleValueAndAdvance."""
    dtype = flat.dtype
    if dtype == object or dtype.kind == "S":
        # IsNamedTensorBytes: base64 exactly for aliases ending in "_bytes", raw strings otherwise.
        write = _base64_text if alias.endswith("_bytes") else _string_text
        return [write(tensors._as_bytes(value)) for value in flat]
    if dtype == np.bool_:
        return ["true" if value else "false" for value in flat.tolist()]
    if dtype.kind in "iu":
        return [str(value) for value in flat.tolist()]
    if dtype in (np.float16, np.float32, np.float64):
        return float_texts(flat)
    return [json.dumps(str(value)) for value in flat]


def float_texts(flat: np.ndarray) -> list[str]:
    """WriteDecimal (json_tensor.cc) of each value of a 1-D float16/32/64 array.

    absl::StrCat's six significant digits (printf "%g") when that text reads back (strtof /
    strtod) to the same value, else "%.9g" for float32 (float16 is widened to float32 first,
    as TF does) or "%.17g" for float64; ".0" is added to text with neither '.' nor 'e';
    NaN, Infinity and -Infinity as such. Vectorised: one "%g" and one parse per value, with
    the rare values whose six digits do not round-trip redone one by one.
    """
    is_double = flat.dtype == np.float64
    with np.errstate(invalid="ignore", over="ignore"):  # signalling NaNs and overflow are handled below
        values = flat.astype(np.float64 if is_double else np.float32)
        wide = values.astype(np.float64)
        texts = ["%g" % value for value in wide.tolist()]
        parsed = np.array(texts, dtype=np.float64)  # strtod of each text ("nan"/"inf" included)
        same = parsed == wide if is_double else _reads_back_as_float32(texts, parsed, values)
    finite = np.isfinite(wide)
    precise = "%.17g" if is_double else "%.9g"
    for index in np.flatnonzero(finite & ~same).tolist():
        texts[index] = precise % wide[index]
    texts = [text if ("." in text or "e" in text) else text + ".0" for text in texts]
    for index in np.flatnonzero(~finite).tolist():
        value = wide[index]
        texts[index] = "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return texts


def _reads_back_as_float32(texts: list[str], parsed: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Whether strtof(text) == value, from strtod's double of each text.

    Rounding the double to float32 equals strtof except when the double falls exactly halfway
    between two float32 values (double rounding); those rare texts are decided exactly.
    """
    rounded = parsed.astype(np.float32)
    same = rounded == values
    neighbour = np.nextafter(rounded, np.where(parsed > rounded, np.float32(np.inf), np.float32(-np.inf)))
    halfway = np.isfinite(parsed) & (2 * parsed == rounded.astype(np.float64) + neighbour.astype(np.float64))
    for index in np.flatnonzero(halfway).tolist():
        exact, double = Fraction(texts[index]), Fraction(float(parsed[index]))
        if exact != double:  # the text lies off the midpoint, on the side strtof rounds to
            below, above = sorted((float(rounded[index]), float(neighbour[index])))
            same[index] = (above if exact > double else below) == float(values[index])
    return same


# rapidjson's Writer::WriteString: '"', '\\' and control bytes escaped, every other byte as it is.
_JSON_ESCAPES = {code: "\\u%04X" % code for code in range(0x20)}
_JSON_ESCAPES.update({0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r",
                      ord('"'): '\\"', ord("\\"): "\\\\"})


def _string_text(value: bytes) -> str:
    """A DT_STRING value as a raw JSON string, as TF Serving's rapidjson writer sends it.

    rapidjson copies the bytes without checking UTF-8, so a value that is not UTF-8 reaches
    the client as those very bytes (a body that is then not valid UTF-8 JSON). They travel
    here as lone surrogates ("surrogateescape") until the reply is encoded.
    """
    return '"' + value.decode("utf-8", "surrogateescape").translate(_JSON_ESCAPES) + '"'


def _base64_text(value: bytes) -> str:
    return '{"b64": "' + base64.b64encode(value).decode("ascii") + '"}'


# ---------------- HTTP plumbing ----------------
class _BodyRefused(Exception):
    """A request body the HTTP layer will not pass on: gRPC code, message, HTTP status, and
    whether the connection must close (the rest of the body was not read)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None, close: bool = False):
        super().__init__(message)
        self.code, self.message, self.http_status, self.close = code, message, http_status, close


class _Handler(http.server.BaseHTTPRequestHandler):
    api: RestApi
    max_body_bytes: int
    post_slots: threading.BoundedSemaphore  # one per inference POST allowed to run at once
    max_concurrent_posts: int
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._dispatch("GET", None)

    def do_POST(self):
        chunked, length, framing_error = self._body_framing()
        if framing_error is not None:
            self.close_connection = True  # where the body ends is unknown: nothing after it can be parsed
            return self._send(*framing_error)
        if not chunked and length > self.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as a request
            return self._send(*self._too_large(f"Request body of {length} bytes"))
        # Take a slot before reading the body, so refused requests never buffer theirs.
        if not self.post_slots.acquire(blocking=False):
            if chunked:
                self.close_connection = True  # a chunked body is not drained: its size is unknown
            return self._refuse_busy(0 if chunked else length)
        try:
            try:
                body = self._read_chunked() if chunked else self.rfile.read(length)
                body = self._decoded(body)
            except _BodyRefused as refusal:
                self.close_connection = self.close_connection or refusal.close
                return self._send(*self.api.refuse("POST", self.path, refusal.code, refusal.message,
                                                   refusal.http_status))
            self._dispatch("POST", body)
        finally:
            self.post_slots.release()

    def _body_framing(self):
        """(chunked, Content-Length, error reply or None) from the request headers.

        Transfer-Encoding wins over Content-Length (RFC 9112 6.3); only "chunked" is a
        transfer coding we read, as libevent behind TF Serving.
        """
        transfer = self.headers.get("Transfer-Encoding")
        if transfer is not None:
            if transfer.strip().lower() != "chunked":
                return False, 0, self.api.refuse("POST", self.path, grpc.StatusCode.UNIMPLEMENTED,
                                                 f"Unsupported Transfer-Encoding: {transfer}")
            return True, 0, None
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            return False, 0, self.api.refuse("POST", self.path, grpc.StatusCode.INVALID_ARGUMENT,
                                             "Invalid Content-Length header")
        return False, length, None

    def _too_large(self, what: str):
        return self.api.refuse("POST", self.path, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{what} exceeds the limit of {self.max_body_bytes} bytes", 413)

    def _read_chunked(self) -> bytes:
        """A chunked body (RFC 9112 7.1), refused once it passes max_body_bytes.

        Any refusal closes the connection, so unread chunks are never parsed as a request.
        """
        parts, total = [], 0
        while True:
            size = self._chunk_size(self.rfile.readline(1026))
            if size == 0:
                break
            if total + size > self.max_body_bytes:
                raise _BodyRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Chunked request body exceeds the limit "
                                   f"of {self.max_body_bytes} bytes", 413, close=True)
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, "Malformed chunked request body", close=True)
            parts.append(data)
            total += size
        for _ in range(100):  # trailer fields up to the blank line, ignored
            if self.rfile.readline(8194) in (b"\r\n", b"\n", b""):
                return b"".join(parts)
        raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, "Malformed chunked request body", close=True)

    @staticmethod
    def _chunk_size(line: bytes) -> int:
        text = line.split(b";", 1)[0].strip()  # chunk extensions after ';' are ignored
        if not line.endswith(b"\n") or not 0 < len(text) <= 16 or text.strip(b"0123456789abcdefABCDEF"):
            raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, "Malformed chunked request body", close=True)
        return int(text, 16)

    def _decoded(self, body: bytes) -> bytes:
        """The body, gunzipped when Content-Encoding names gzip (as net_http's auto_uncompress_input).

        The decompressed size is held to max_body_bytes as well, so a small "gzip bomb" is
        refused after inflating at most one byte past the limit.
        """
        if "gzip" not in self.headers.get("Content-Encoding", "").lower():
            return body
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error as error:
            raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to decompress the gzip request body: {error}")
        if len(inflated) > self.max_body_bytes:
            raise _BodyRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Decompressed request body exceeds the limit "
                               f"of {self.max_body_bytes} bytes", 413)
        if not inflater.eof or inflater.unused_data:
            raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               "Failed to decompress the gzip request body: truncated or followed by other data")
        return inflated

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
            self.close_connection = True
            message = f"Malformed request: {self.command} {urllib.parse.urlsplit(self.path).path}"
            return self._send(*self.api.refuse(self.command, self.path, grpc.StatusCode.INVALID_ARGUMENT, message))
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
        if self.close_connection:
            self.send_header("Connection", "close")  # so the client opens a new one for its next request
        self.end_headers()
        self.wfile.write(payload)
        if self.close_connection:
            self._linger()

    def _linger(self, budget_bytes: int = 1 << 20, seconds: float = 2.0) -> None:
        """A lingering close: stop sending, then read and drop what the client still sends (at
        most `budget_bytes` or `seconds`). Closing a socket with unread data resets the
        connection, and the client may then lose the reply it has not read yet."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            while budget_bytes > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                data = self.connection.recv(min(1 << 16, budget_bytes))
                if not data:
                    break
                budget_bytes -= len(data)
        except OSError:
            pass  # the client is gone or slow: nothing more to do for it

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
