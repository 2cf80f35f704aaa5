"""How the model server reports failures: `ServingError`, status codes and TF Serving's texts.

Every request failure is a `ServingError` carrying a gRPC status code and a message; gRPC
sends both as they are (long messages cut as grpc_status_util.cc cuts them), REST maps the
code to an HTTP status (http_server.cc's ToHTTPStatusCode) and sends the message as
`{"error": ...}`. TF statuses and gRPC statuses share their numbers (`status_code`).
Messages that more than one module raises live here, worded as TF Serving words them.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_LENGTH = 1024
TRUNCATION_SUFFIX = "...TRUNCATED"
# http_server.cc's ToHTTPStatusCode; every other code is 500.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.CANCELLED: 499,
}

# TF Serving's texts for failures raised in more than one place.
MISSING_MODEL_SPEC = "Missing ModelSpec"
NO_MODEL_NAME = "ModelSpec has no name specified."
RELOAD_CONFIG_NOT_SUPPORTED = ("ServerModelConfig type not supported by HandleReloadConfigRequest. "
                               "Only ModelConfigList is currently supported")
# What a client sees of an unexpected exception; the details go to the server's log only.
INTERNAL_ERROR = "internal error"


class ServingError(Exception):
    """A failure reported to the client with a gRPC status code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def truncate_message(message: str) -> str:
    """Cut long messages as TF Serving's grpc_status_util.cc does."""
    if len(message) <= MAX_MESSAGE_LENGTH:
        return message
    return message[:MAX_MESSAGE_LENGTH] + TRUNCATION_SUFFIX


def status_code(number: int, unknown=grpc.StatusCode.UNKNOWN):
    """The gRPC status code of a TF / gRPC status number (`unknown` for numbers neither has)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return unknown


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status TF Serving's REST API answers a request that ended with `code`."""
    return HTTP_STATUS.get(code, 500)
