"""Request running shared by the gRPC services and the REST API.

`RequestRunner.run_work` turns a unit of work into (status code, message, result), hiding the
text of unexpected exceptions; `serve` adds gRPC's deadline check, metrics and abort;
`with_version` holds a loaded version for the length of a request; `model_status` is
GetModelStatus for both protocols.
"""

from __future__ import annotations

import logging
import time

import grpc
from tensorflow_serving.apis import get_model_status_pb2

from serving import errors
from serving.errors import ServingError, invalid_argument

LOG = logging.getLogger("serving.request_runner")


class RequestRunner:
    """Turns a unit of work into a response or a gRPC status, recording metrics."""

    def __init__(self, manager, metrics=None):
        self.manager = manager
        self.metrics = metrics

    def serve(self, context, api: str, model_name: str, work, record: bool = True):
        started = time.monotonic()
        code, message, response = grpc.StatusCode.OK, "", None
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining <= 0:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded"
        else:
            code, message, response = self.run_work(work)
        if record and self.metrics is not None:
            micros = (time.monotonic() - started) * 1e6
            self.metrics.record(model_name, code.name, api, "GRPC", micros)
        if code != grpc.StatusCode.OK:
            context.abort(code, errors.truncate_message(message))
        return response

    @staticmethod
    def run_work(work):
        """(code, message, response) of work(); hides unexpected exception text."""
        try:
            return grpc.StatusCode.OK, "", work()
        except ServingError as error:
            return error.code, error.message, None
        except Exception:
            LOG.exception("unexpected error while serving a request")
            return grpc.StatusCode.INTERNAL, errors.INTERNAL_ERROR, None

    def with_version(self, request_spec, has_spec: bool, action):
        """Acquire the servable for a ModelSpec, run action(loaded), release it."""
        if not has_spec:
            raise invalid_argument(errors.MISSING_MODEL_SPEC)
        loaded = self.manager.acquire(request_spec)
        try:
            return action(loaded)
        finally:
            loaded.release()


def model_status(manager, request) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus: every known version of the model (or the one asked for), newest first.

    As get_model_status_impl.cc, an empty name is looked up like any other: NOT_FOUND.
    """
    if not request.HasField("model_spec"):
        raise invalid_argument(errors.MISSING_MODEL_SPEC)
    version = request.model_spec.version.value if request.model_spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, status in manager.version_statuses(request.model_spec.name, version):
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = status.state
        entry.status.error_code = status.error_code
        entry.status.error_message = status.error_message
    return response
