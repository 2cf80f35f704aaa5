"""The Open Inference Protocol's gRPC service, `inference.GRPCInferenceService`, on the gRPC port.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer; the other RPCs
of the service (streaming, repository, shared memory, ...) answer UNIMPLEMENTED. The messages are
tritonclient's (`tritonclient.grpc.service_pb2`): kserve and mlserver define the same proto
package, and two definitions of it in one process fail to import, so they come from that one
package only. Failures carry the gRPC codes the rest of the server uses (NOT_FOUND for an unknown
model or version, INVALID_ARGUMENT for a bad request, ...) through request_runner.RequestRunner,
which also counts ModelInfer in the metrics. Inputs come in the typed `contents` or as
`raw_input_contents` (one per input); outputs always go out as `raw_output_contents`, as Triton
sends them.
"""

from __future__ import annotations

import functools

from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.errors import invalid_argument
from serving.prediction import monotonic_deadline
from serving.request_runner import RequestRunner
from serving.v2_inference import RequestInput, array_from_raw, array_from_values, datatype_of_array, raw_bytes

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The typed field of InferTensorContents for each datatype; FP16 and BF16 travel raw only.
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def add_to_server(models, runner: RequestRunner, server) -> None:
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GRPCInferenceService(models, runner), server)


class GRPCInferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models, runner: RequestRunner):
        self.models = models  # v2_inference.V2Models
        self.runner = runner

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.models.server_live())

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.models.server_ready())

    def ModelReady(self, request, context):
        """ready false, not an error, for a model, signature or version that is not loaded."""
        ready, _why = self.models.model_ready(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**self.models.server_metadata())

    def ModelMetadata(self, request, context):
        def work():
            metadata = self.models.metadata(request.name, request.version)
            response = service_pb2.ModelMetadataResponse(
                name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"])
            for tensor in metadata["inputs"]:
                response.inputs.add(**tensor)
            for tensor in metadata["outputs"]:
                response.outputs.add(**tensor)
            return response
        return self.runner.serve(context, "ModelMetadata", request.name, work, record=False)

    def ModelInfer(self, request, context):
        def work():
            output_names = [output.name for output in request.outputs] or None
            target, version, outputs = self.models.infer(request.model_name, request.model_version,
                                                         request_inputs(request), output_names,
                                                         deadline=monotonic_deadline(context))
            response = service_pb2.ModelInferResponse(model_name=target.name, model_version=str(version),
                                                      id=request.id)
            for name, array in outputs.items():
                response.outputs.add(name=name, datatype=datatype_of_array(array), shape=array.shape)
                response.raw_output_contents.append(raw_bytes(array))
            return response
        return self.runner.serve(context, "ModelInfer", self.models.metrics_name(request.model_name), work)


def request_inputs(request) -> list[RequestInput]:
    """The inputs of a ModelInferRequest, each decoded from its contents or its raw_input_contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid_argument(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs: "
                               "give one per input, in input order")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise invalid_argument(f"input '{tensor.name}': 'contents' must not be given with raw_input_contents")
            decode = functools.partial(array_from_raw, raw=raw[index])
        else:
            decode = functools.partial(_array_from_contents, contents=tensor.contents)
        inputs.append(RequestInput(tensor.name, tensor.datatype, tuple(tensor.shape), decode))
    return inputs


def _array_from_contents(datatype: str, shape: tuple, count: int, contents):
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise invalid_argument(f"{datatype} data must be sent in raw_input_contents")
    return array_from_values(datatype, shape, count, getattr(contents, field))
