"""gRPC servicers: tensorflow.serving.PredictionService and ModelService.

Each RPC resolves the ModelSpec to a loaded version, runs the shared logic in inference.py
and maps failures to TF Serving's status codes. Unexpected exceptions never reach the client:
they become INTERNAL "internal error" plus a server-side log line.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.apis import status_pb2

from serving import inference
from serving.tensors import ServingError, invalid_argument, truncate_message

LOG = logging.getLogger("serving.prediction")


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
            context.abort(code, truncate_message(message))
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
            return grpc.StatusCode.INTERNAL, "internal error", None

    def with_version(self, request_spec, has_spec: bool, action):
        """Acquire the servable for a ModelSpec, run action(loaded), release it."""
        if not has_spec:
            raise invalid_argument("Missing ModelSpec")
        loaded = self.manager.acquire(request_spec)
        try:
            return action(loaded)
        finally:
            loaded.release()


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict, Classify, Regress, MultiInference and GetModelMetadata."""

    def __init__(self, runner: RequestRunner, max_request_elements: int, batcher=None,
                 tensor_content: bool = False):
        self.runner = runner
        self.max_request_elements = max_request_elements
        self.batcher = batcher
        self.tensor_content = tensor_content

    def Predict(self, request, context):
        batch_runner = None
        if self.batcher is not None:
            # The batcher drops this request if its deadline passes while it waits in the queue.
            batch_runner = functools.partial(self.batcher.run, deadline=monotonic_deadline(context))

        def action(loaded):
            return inference.predict(loaded, request, self.max_request_elements, batch_runner,
                                     self.tensor_content)
        return self._serve(context, "Predict", request, action)

    def Classify(self, request, context):
        return self._serve(context, "Classify", request, lambda loaded: inference.classify(loaded, request))

    def Regress(self, request, context):
        return self._serve(context, "Regress", request, lambda loaded: inference.regress(loaded, request))

    def MultiInference(self, request, context):
        spec = request.tasks[0].model_spec if request.tasks else None

        def work():
            if spec is None:
                raise invalid_argument("MultiInferenceRequest must specify at least one task")
            return self.runner.with_version(spec, True, lambda loaded: inference.multi_inference(loaded, request))
        name = spec.name if spec is not None else ""
        return self.runner.serve(context, "MultiInference", name, work)

    def GetModelMetadata(self, request, context):
        def work():
            return self.runner.with_version(request.model_spec, request.HasField("model_spec"),
                                            lambda loaded: inference.model_metadata(loaded, request))
        return self.runner.serve(context, "GetModelMetadata", request.model_spec.name, work, record=False)

    def _serve(self, context, api, request, action):
        def work():
            return self.runner.with_version(request.model_spec, request.HasField("model_spec"), action)
        return self.runner.serve(context, api, request.model_spec.name, work)


def monotonic_deadline(context) -> float | None:
    """The client's deadline on the time.monotonic() clock, or None when it set none."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, runner: RequestRunner):
        self.runner = runner

    def GetModelStatus(self, request, context):
        return self.runner.serve(context, "GetModelStatus", request.model_spec.name,
                                 lambda: model_status(self.runner.manager, request), record=False)

    def HandleReloadConfigRequest(self, request, context):
        def work():
            if request.config.WhichOneof("config") != "model_config_list":
                raise invalid_argument("ServerModelConfig type not supported by HandleReloadConfigRequest. "
                                       "Only ModelConfigList is currently supported")
            self.runner.manager.reload_config(request.config)
            return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))
        return self.runner.serve(context, "HandleReloadConfigRequest", "", work, record=False)


def model_status(manager, request) -> get_model_status_pb2.GetModelStatusResponse:
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    if not request.model_spec.name:
        raise invalid_argument("ModelSpec has no name specified.")
    version = request.model_spec.version.value if request.model_spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, status in manager.version_statuses(request.model_spec.name, version):
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = status.state
        entry.status.error_code = status.error_code
        entry.status.error_message = status.error_message
    return response
