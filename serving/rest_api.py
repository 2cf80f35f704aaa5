"""TF Serving's REST API (http_rest_api_handler.cc): routing, model lookup and replies.

Paths, HTTP codes and the JSON shapes follow http_rest_api_handler.cc: `:predict` (row
`instances` -> `predictions`, columnar `inputs` -> `outputs`), `:classify` / `:regress`
(`results`), model status and metadata, and the Prometheus page when a monitoring config
enables it. JSON <-> tensors is json_tensor.py; the HTTP server around this is http_server.py.
Outside `/v1/`, `GET` also serves the playground page (page.py).

CORS follows http_server.cc: an `OPTIONS` under `/v1/` is a preflight, answered 200 when its
`Origin` header holds "http://" or "https://" and FAILED_PRECONDITION (400) otherwise, whether or
not CORS support is on; with `--rest_api_enable_cors_support`, every reply under `/v1/` (errors
and preflights included) carries AddCORSHeaders' three headers (`CORS_HEADERS`).
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from serving import errors, inference, json_tensor, page, v2_rest
from serving.errors import invalid_argument
from serving.request_runner import RequestRunner, model_status

PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
# http_rest_api_util.cc AddCORSHeaders, added to every reply under /v1/ when CORS support is on.
CORS_HEADERS = (("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "POST, GET"),
                ("Access-Control-Allow-Headers", "Content-Type"))
PREFLIGHT_ORIGIN = re.compile(r"https?://")  # RE2::PartialMatch in http_server.cc
# What libevent writes on a reply without a Content-Type (evhttp's default_content_type).
LIBEVENT_CONTENT_TYPE = "text/html; charset=ISO-8859-1"


class RestApi:
    """The request logic behind the HTTP handler; returns (http status, body, content type).

    Every request under `/v1/` is counted in request_count with the gRPC code it ended with
    (status and metadata GETs and malformed requests too), as TF Serving's REST dispatcher does;
    the model name is the one in the path ("" when the path names none).
    """

    def __init__(self, manager, metrics, max_request_elements: int, batcher=None,
                 prometheus_path: str | None = None, cors: bool = False, v2=None):
        self.manager = manager
        self.metrics = metrics
        self.max_request_elements = max_request_elements
        self.batcher = batcher
        self.prometheus_path = prometheus_path  # None: no metrics page, as TF without a monitoring config
        self.cors = cors
        self.v2 = v2  # v2_rest.V2RestApi: the Open Inference Protocol's routes under /v2, or None

    def handle(self, method: str, raw_path: str, body: bytes | None, headers=None):
        """(HTTP status, body, content type), and a dict of extra headers for /v2 replies."""
        path = urllib.parse.urlsplit(raw_path).path
        if self.prometheus_path is not None and path == self.prometheus_path:
            return 200, self.metrics.render().encode(), "text/plain"
        if method == "GET" and (asset := page.asset(path)) is not None:
            return asset
        if self.v2 is not None and v2_rest.is_v2_path(path):
            return self.v2.handle(method, path, body, headers)
        if not _is_api_path(path):
            return 404, json_tensor.error_json(f"Not found: {method} {path}"), "application/json"
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

    def preflight(self, raw_path: str, origin: str | None):
        """The reply to an OPTIONS request, as http_server.cc's dispatcher gives it.

        Under /v1/ (and /v2, alike): 200 with an empty body when Origin holds "http://" or "https://", else
        FAILED_PRECONDITION (400; TF Serving sends it without a body, we send the JSON error),
        counted like any request under /v1/ (model ""). Elsewhere: 404.
        """
        started = time.monotonic()
        path = urllib.parse.urlsplit(raw_path).path
        if not self._is_any_api_path(path):
            return 404, json_tensor.error_json(f"Not found: OPTIONS {path}"), "application/json"
        if PREFLIGHT_ORIGIN.search(origin or ""):
            code, reply = grpc.StatusCode.OK, (200, b"", LIBEVENT_CONTENT_TYPE)
        else:
            code = grpc.StatusCode.FAILED_PRECONDITION
            reply = _error_reply(code, "Origin header is missing in CORS preflight")
        self.metrics.record("", code.name, "", "REST", (time.monotonic() - started) * 1e6)
        return reply

    def extra_headers(self, raw_path: str) -> tuple[tuple[str, str], ...]:
        """Headers a reply to `raw_path` carries beyond Content-Type and Content-Length."""
        if self.cors and self._is_any_api_path(urllib.parse.urlsplit(raw_path).path):
            return CORS_HEADERS
        return ()

    def _is_any_api_path(self, path: str) -> bool:
        """Under TF Serving's /v1/, or the Open Inference Protocol's /v2 when it is on: where CORS applies."""
        return _is_api_path(path) or (self.v2 is not None and v2_rest.is_v2_path(path))

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
        code, message, result = RequestRunner.run_work(work)
        if code != grpc.StatusCode.OK:
            return code, _error_reply(code, message)
        # surrogateescape: raw string outputs carry bytes that are not UTF-8 (see json_tensor._string_text).
        return code, (200, result.encode("utf-8", "surrogateescape"), "application/json")

    def _run_inference(self, name, version, label, verb, body: bytes) -> str:
        document = json_tensor.parse_json_body(body)
        spec = model_spec(name, version, label, document.get("signature_name", ""))
        loaded = self.manager.acquire(spec)
        try:
            if verb == "predict":
                return self._predict(loaded, spec, document)
            model_input = json_tensor.examples_input(document)
            if verb == "classify":
                _name, result = inference.classify_result(loaded, spec.signature_name, model_input)
                return json_tensor.classify_json(result)
            _name, result = inference.regress_result(loaded, spec.signature_name, model_input)
            return json_tensor.regress_json(result)
        finally:
            loaded.release()

    def _predict(self, loaded, spec, document: dict) -> str:
        signature_name = spec.signature_name or inference.DEFAULT_SIGNATURE
        signature = loaded.signature_defs.get(signature_name)
        if signature is None:
            raise invalid_argument(f'Serving signature name: "{signature_name}" not found in signature def')
        row_format, feeds = json_tensor.json_feeds(document, signature)
        runner = self.batcher.run if self.batcher is not None else None
        # Arrays straight from JSON to the model and back: no TensorProto in between.
        _name, outputs = inference.predict_arrays(loaded, signature_name, feeds, self.max_request_elements, runner)
        return json_tensor.predictions_json(outputs, row_format)

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
        response = model_status(self.manager, request)
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
    return errors.http_status(code), json_tensor.error_json(errors.truncate_message(message)), "application/json"


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
