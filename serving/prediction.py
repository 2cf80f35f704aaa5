"""gRPC servicers: tensorflow.serving.PredictionService and ModelService.

Each RPC resolves the ModelSpec to a loaded version, runs the shared logic in inference.py
through request_runner.RequestRunner (shared with REST) and maps failures to TF Serving's
status codes. Unexpected exceptions never reach the client: they become INTERNAL "internal
error" plus a server-side log line.
"""

from __future__ import annotations

import functools
import time

from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc
from tensorflow_serving.apis import status_pb2

from serving import errors, inference
from serving.errors import invalid_argument
from serving.request_runner import RequestRunner, model_status


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict, Classify, Regress, MultiInference and GetModelMetadata."""

    def __init__(self, runner: RequestRunner, max_request_elements: int, batcher=None):
        self.runner = runner
        self.max_request_elements = max_request_elements
        self.batcher = batcher

    def Predict(self, request, context):
        batch_runner = None
        if self.batcher is not None:
            # The batcher drops this request if its deadline passes while it waits in the queue.
            batch_runner = functools.partial(self.batcher.run, deadline=monotonic_deadline(context))

        def action(loaded):
            return inference.predict(loaded, request, self.max_request_elements, batch_runner)
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
            # get_model_metadata_impl.cc checks the fields before it looks the model up.
            if request.HasField("model_spec"):
                inference.check_metadata_fields(request)
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
                raise invalid_argument(errors.RELOAD_CONFIG_NOT_SUPPORTED)
            self.runner.manager.reload_config(request.config)
            return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))
        return self.runner.serve(context, "HandleReloadConfigRequest", "", work, record=False)

