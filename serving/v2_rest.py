"""The Open Inference Protocol's REST API (`/v2/...`) on the REST port, beside TF Serving's `/v1/`.

Routes and bodies follow the protocol's inference_rest.md; where it leaves a choice, this does what
Triton's http_server.cc does, which tritonclient.http is written against: a server or model that
is not ready answers 400 with `{"error": ...}`, a wrong method 405, an unknown path 404; request
failures carry the HTTP status of their gRPC code (errors.http_status: NOT_FOUND 404,
INVALID_ARGUMENT 400, ...) and `{"error": ...}`.

The binary tensor data extension: with an `Inference-Header-Content-Length` header, the body is that
many bytes of JSON followed by the raw data of each input that gives `"binary_data_size"` in its
parameters, in input order. An output is sent raw after the JSON when it asks for
`"binary_data": true`, or, when the request lists no outputs, when the request's parameters say
`"binary_data_output": true`; the reply then carries the same header and `binary_data_size` on
each such output, as `application/octet-stream`. BYTES output that is not UTF-8 text (PNGs) can
only travel this way.
"""

from __future__ import annotations

import functools
import json
import re
import time
import urllib.parse

import grpc
import numpy as np

from serving import errors, json_tensor, tensors
from serving.errors import invalid_argument
from serving.request_runner import RequestRunner
from serving.v2_inference import RequestInput, array_from_raw, array_from_values, datatype_of_array, raw_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?")
JSON = "application/json"
# The Python types a JSON `data` element may have for each kind of datatype.
_JSON_TYPES = {"BOOL": (bool,), "BYTES": (str,), "int": (int,), "float": (int, float)}
_JSON_NAMES = {bool: "a boolean", str: "a string", int: "a number", float: "a number", dict: "an object"}


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class V2RestApi:
    """The `/v2` routes; `handle` returns (HTTP status, body, content type, extra headers)."""

    def __init__(self, models, metrics):
        self.models = models  # v2_inference.V2Models
        self.metrics = metrics

    def handle(self, method: str, path: str, body: bytes | None, headers=None):
        if path in ("/v2", "/v2/"):
            return _get_only(method, lambda: _json_reply(self.models.server_metadata()))
        if path in ("/v2/health/live", "/v2/health/ready"):
            live = path.endswith("live")
            return _get_only(method, lambda: self._health(live))
        match = MODEL_PATH.fullmatch(path)
        if match is None:
            return _error(404, "Not Found")
        name = urllib.parse.unquote(match.group(1))
        version = urllib.parse.unquote(match.group(2) or "")
        verb = match.group(3)
        if verb == "infer":
            if method != "POST":
                return _error(405, "Method Not Allowed")
            return self._infer(name, version, body or b"", headers)
        if verb == "ready":
            return _get_only(method, lambda: self._model_ready(name, version))
        return _get_only(method, lambda: self._respond(lambda: _json_reply(self.models.metadata(name, version))))

    def _health(self, live: bool):
        if live:
            ok, what = self.models.server_live(), "live"
        else:
            ok, what = self.models.server_ready(), "ready"
        if ok:
            return _json_reply({what: True})
        return _error(400, f"Server not {what}" + ("" if live else ": a configured model has no version available"))

    def _model_ready(self, name: str, version: str):
        ready, why = self.models.model_ready(name, version)
        if ready:
            return _json_reply({"name": name, "ready": True})
        return _error(400, f"Model version not ready: {why}")

    @staticmethod
    def _respond(work):
        code, message, reply = RequestRunner.run_work(work)
        return reply if code == grpc.StatusCode.OK else _failure(code, message)

    def _infer(self, name: str, version: str, body: bytes, headers):
        """Inference, counted in the metrics as TF Serving's `:predict` is (API label "infer")."""
        started = time.monotonic()
        code, message, reply = RequestRunner.run_work(lambda: self._run_infer(name, version, body, headers))
        self.metrics.record(self.models.metrics_name(name), code.name, "infer", "REST",
                            (time.monotonic() - started) * 1e6)
        return reply if code == grpc.StatusCode.OK else _failure(code, message)

    def _run_infer(self, name: str, version: str, body: bytes, headers):
        header_length = headers.get(HEADER_LENGTH) if headers is not None else None
        json_part, binary = _split_body(body, header_length)
        document = json_tensor.parse_json_body(json_part)
        request_id = document.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise invalid_argument("'id' must be a string")
        inputs = _request_inputs(document, binary, header_length is not None)
        output_names, is_binary = _requested_outputs(document)
        target, number, outputs = self.models.infer(name, version, inputs, output_names)
        return _infer_reply(target.name, number, request_id, outputs, is_binary)


# ---------------- request ----------------
def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of an inference request body."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise invalid_argument(f"Unable to parse {HEADER_LENGTH}, got: {header_length[:100]}") from None
    if not 0 <= length <= len(body):
        raise invalid_argument(f"{HEADER_LENGTH} must be in 0..{len(body)} (the body's size), got: {length}")
    return body[:length], body[length:]


def _parameters(item: dict, where: str) -> dict:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise invalid_argument(f"'parameters' of {where} must be a JSON object")
    return parameters


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid_argument(f"{where} needs a string '{key}'")
    return value


def _request_inputs(document: dict, binary: bytes, has_header: bool) -> list[RequestInput]:
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid_argument("'inputs' must be a non-empty JSON array of input tensors")
    parsed, offset = [], 0
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise invalid_argument(f"'inputs' item {index} is not a JSON object")
        name = _string(item, "name", f"'inputs' item {index}")
        datatype = _string(item, "datatype", f"input '{name}'")
        shape = item.get("shape")
        if not isinstance(shape, list) or any(type(size) is not int for size in shape):
            raise invalid_argument(f"input '{name}' needs a 'shape' that is a JSON array of integers")
        size = _parameters(item, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise invalid_argument(f"input '{name}': 'binary_data_size' must be a non-negative integer")
            if "data" in item:
                raise invalid_argument(f"input '{name}' has both 'data' and 'binary_data_size'")
            if offset + size > len(binary):
                where = "after the JSON header" if has_header else f"(no {HEADER_LENGTH} header was sent)"
                raise invalid_argument(f"input '{name}': 'binary_data_size' {size} runs past the {len(binary)} bytes "
                                       f"of binary data {where}")
            decode = functools.partial(array_from_raw, raw=binary[offset:offset + size])
            offset += size
        elif "data" in item:
            decode = functools.partial(_array_from_json, data=item["data"])
        else:
            raise invalid_argument(f"input '{name}' has neither 'data' nor a 'binary_data_size' parameter")
        parsed.append(RequestInput(name, datatype, tuple(shape), decode))
    if offset != len(binary):
        raise invalid_argument(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input")
    return parsed


def _array_from_json(datatype: str, shape: tuple, count: int, data) -> np.ndarray:
    return array_from_values(datatype, shape, count, _flat_values(data, datatype, count))


def _flat_values(data, datatype: str, count: int) -> list:
    """The elements of a `data` array, nested or flat, in row-major order; each must be of the
    datatype's JSON type (booleans for BOOL, strings for BYTES, integers for integer types)."""
    if not isinstance(data, list):
        raise invalid_argument("'data' must be a JSON array")
    kind = datatype if datatype in ("BOOL", "BYTES") else ("float" if datatype.startswith(("FP", "BF")) else "int")
    allowed = _JSON_TYPES[kind]
    values, stack = [], [iter(data)]
    while stack:  # iterative: the nesting depth is the client's choice
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if type(item) not in allowed:
                raise invalid_argument(f"'data' element {len(values)} is {_JSON_NAMES.get(type(item), 'null')}, "
                                       f"not a {datatype} value")
            values.append(item)
            if len(values) > count:
                raise invalid_argument(f"'data' has more than the {count} values its shape holds")
        else:
            stack.pop()
    return values


def _requested_outputs(document: dict):
    """(output names or None for all, name -> whether it goes out as binary data)."""
    default = _parameters(document, "the request").get("binary_data_output", False)
    if not isinstance(default, bool):
        raise invalid_argument("'binary_data_output' must be true or false")
    outputs = document.get("outputs")
    if outputs is None:
        return None, lambda _name: default
    if not isinstance(outputs, list):
        raise invalid_argument("'outputs' must be a JSON array of requested outputs")
    names, binary = [], {}
    for index, item in enumerate(outputs):
        if not isinstance(item, dict):
            raise invalid_argument(f"'outputs' item {index} is not a JSON object")
        name = _string(item, "name", f"'outputs' item {index}")
        flag = _parameters(item, f"output '{name}'").get("binary_data", False)  # a listed output: JSON unless asked
        if not isinstance(flag, bool):
            raise invalid_argument(f"output '{name}': 'binary_data' must be true or false")
        names.append(name)
        binary[name] = flag
    return names, binary.__getitem__


# ---------------- reply ----------------
def _infer_reply(model_name: str, version: int, request_id, outputs: dict, is_binary):
    header = {"model_name": model_name, "model_version": str(version)}
    if request_id is not None:
        header["id"] = request_id
    texts, blobs = [], []
    for name, array in outputs.items():
        head = (f'{{"name":{json.dumps(name)},"datatype":"{datatype_of_array(array)}",'
                f'"shape":{json.dumps([int(size) for size in array.shape])}')
        if is_binary(name):
            blobs.append(raw_bytes(array))
            texts.append(f'{head},"parameters":{{"binary_data_size":{len(blobs[-1])}}}}}')
        else:
            texts.append(f'{head},"data":[{",".join(_data_texts(name, array))}]}}')
    text = json.dumps(header, separators=(",", ":"))[:-1] + ',"outputs":[' + ",".join(texts) + "]}"
    payload = text.encode("utf-8")
    if not blobs:
        return 200, payload, JSON, {}
    return 200, payload + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(payload))}


def _data_texts(name: str, array: np.ndarray) -> list[str]:
    """JSON text of each element, row-major: numbers as TF Serving's REST API writes them."""
    flat = array.reshape(-1)
    if flat.dtype == object:
        try:
            return [json.dumps(tensors.as_bytes(value).decode("utf-8")) for value in flat]
        except UnicodeDecodeError:
            raise invalid_argument(
                f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot carry: ask for it as binary "
                f'data ("outputs": [{{"name": "{name}", "parameters": {{"binary_data": true}}}}])') from None
    if flat.dtype == np.bool_:
        return ["true" if value else "false" for value in flat.tolist()]
    if flat.dtype.kind in "iu":
        return [str(value) for value in flat.tolist()]
    if flat.dtype not in (np.float16, np.float32, np.float64):
        flat = flat.astype(np.float32)  # bfloat16
    return json_tensor.float_texts(flat)


def _json_reply(value: dict):
    return 200, json.dumps(value, separators=(",", ":")).encode("utf-8"), JSON, {}


def _error(status: int, message: str):
    return status, json_tensor.error_json(message), JSON, {}


def _failure(code: grpc.StatusCode, message: str):
    return _error(errors.http_status(code), errors.truncate_message(message))


def _get_only(method: str, reply):
    return reply() if method == "GET" else _error(405, "Method Not Allowed")
