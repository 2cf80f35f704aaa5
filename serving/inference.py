"""Request handling shared by gRPC, REST and warmup: Predict, Classify, Regress,
MultiInference and GetModelMetadata against one loaded version.

The checks and messages follow TF Serving's predict_util.cc, classifier.cc, regressor.cc
and get_model_metadata_impl.cc, so clients see the same status codes and texts.
"""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, inference_pb2,
                                     predict_pb2, prediction_log_pb2, regression_pb2)

from serving import errors, tensors
from serving.errors import ServingError, invalid_argument

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
MAX_WARMUP_RECORDS = 1000  # WarmupConsts::kMaxNumRecords


def run_signature(loaded, signature, feeds: dict, output_aliases: list[str]) -> dict:
    """Run a SignatureDef on alias -> array feeds; returns alias -> array for the outputs."""
    feeds_by_name = {signature.inputs[alias].name: value for alias, value in feeds.items()}
    fetch_names = [signature.outputs[alias].name for alias in output_aliases]
    try:
        results = loaded.run(feeds_by_name, fetch_names)
    except tf.errors.OpError as error:
        raise ServingError(errors.status_code(error.error_code), error.message) from None
    return dict(zip(output_aliases, results))


# ---------------- Predict ----------------
def signature_for_predict(loaded, signature_name: str):
    name = signature_name or DEFAULT_SIGNATURE
    if name not in loaded.signature_defs:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
    return name, loaded.signature_defs[name]


def check_input_aliases(signature, sent: list[str]) -> None:
    expected = set(signature.inputs)
    if len(sent) != len(expected) or set(sent) != expected:
        if len(sent) != len(expected):
            extra = sorted(set(sent) - expected)
            missing = sorted(expected - set(sent))
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.")
        unknown = sorted(set(sent) - expected)[0]
        raise invalid_argument(
            f"input tensor alias not found in signature: {unknown}. "
            f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.")


def output_aliases_for(signature, output_filter) -> list[str]:
    if not output_filter:
        return sorted(signature.outputs)
    seen = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                f"set {{{','.join(sorted(signature.outputs))}}}.")
        if alias in seen:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(output_filter)


def parse_inputs(request_inputs, max_elements: int) -> dict:
    """alias -> array for a request's input map, with the total element limit enforced."""
    feeds = {}
    remaining = max_elements
    for alias in sorted(request_inputs):
        try:
            array = tensors.proto_to_ndarray(request_inputs[alias], remaining)
        except ServingError as error:
            raise invalid_argument(f"tensor parsing error: {alias}: {error.message}") from None
        remaining -= array.size
        feeds[alias] = array
    return feeds


def check_element_limit(feeds: dict, max_elements: int) -> None:
    """parse_inputs' limit, for inputs that arrive as arrays: the same order and message."""
    remaining = max_elements
    for alias in sorted(feeds):
        array = feeds[alias]
        if array.size > remaining:
            message = tensors.too_many_elements(array.shape, array.size, remaining)
            raise invalid_argument(f"tensor parsing error: {alias}: {message}")
        remaining -= array.size


def _predict_plan(loaded, signature_name: str, input_aliases: list[str], output_filter):
    """(signature name, signature, output aliases) once the request's aliases are checked."""
    signature_name, signature = signature_for_predict(loaded, signature_name)
    check_input_aliases(signature, input_aliases)
    return signature_name, signature, output_aliases_for(signature, output_filter)


def predict(loaded, request: predict_pb2.PredictRequest, max_elements: int,
            runner=None) -> predict_pb2.PredictResponse:
    """TF Serving's Predict on one loaded version. `runner` may batch (see batching.py).

    Outputs are sent in the typed `*_val` fields, as TF Serving sends them.
    """
    signature_name, signature, output_aliases = _predict_plan(
        loaded, request.model_spec.signature_name, list(request.inputs), request.output_filter)
    feeds = parse_inputs(request.inputs, max_elements)
    outputs = (runner or run_signature)(loaded, signature, feeds, output_aliases)
    response = predict_pb2.PredictResponse()
    fill_model_spec(response.model_spec, loaded, signature_name)
    for alias, array in outputs.items():
        response.outputs[alias].CopyFrom(tensors.ndarray_to_proto(array))
    return response


def predict_arrays(loaded, signature_name: str, feeds: dict, max_elements: int,
                   runner=None, output_filter=()) -> tuple[str, dict]:
    """Predict for callers that hold arrays (REST, the Open Inference Protocol): alias -> array
    in, (signature name, alias -> array of each output, all or those in output_filter) out, with
    Predict's checks and no TensorProto between."""
    signature_name, signature, output_aliases = _predict_plan(loaded, signature_name, list(feeds),
                                                              output_filter)
    check_element_limit(feeds, max_elements)
    return signature_name, (runner or run_signature)(loaded, signature, feeds, output_aliases)


def fill_model_spec(model_spec, loaded, signature_name: str) -> None:
    model_spec.name = loaded.name
    model_spec.version.value = loaded.version
    model_spec.signature_name = signature_name


# ---------------- Classify / Regress ----------------
def serialized_examples(model_input) -> np.ndarray:
    which = model_input.WhichOneof("kind")
    if which == "example_list":
        records = [example.SerializeToString() for example in model_input.example_list.examples]
    elif which == "example_list_with_context":
        # Context first, so an example's own feature of the same name wins on merge.
        with_context = model_input.example_list_with_context
        context = with_context.context.SerializeToString()
        records = [context + example.SerializeToString() for example in with_context.examples]
    else:
        records = []
    if not records:
        raise invalid_argument("Input is empty.")
    array = np.empty(len(records), dtype=object)
    array[:] = records
    return array


def _signature_for_method(loaded, signature_name: str, method: str, not_found_message: str):
    name = signature_name or DEFAULT_SIGNATURE
    signature = loaded.signature_defs.get(name)
    if signature is None:
        raise invalid_argument(not_found_message.format(name))
    if signature.method_name != method:
        kind = "classification" if method == CLASSIFY_METHOD else "regression"
        raise invalid_argument(
            f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
    if "inputs" not in signature.inputs or signature.inputs["inputs"].dtype != types_pb2.DT_STRING:
        raise invalid_argument(f"Expected one string input tensor named 'inputs' in signature {name}")
    return name, signature


def classify_result(loaded, signature_name: str, model_input,
                    not_found="No signature was found with the name: {}"):
    name, signature = _signature_for_method(loaded, signature_name, CLASSIFY_METHOD, not_found)
    examples = serialized_examples(model_input)
    wanted = [alias for alias in ("classes", "scores") if alias in signature.outputs]
    if not wanted:
        raise invalid_argument("Expected classification signature outputs to contain classes or scores")
    outputs = run_signature(loaded, signature, {"inputs": examples}, wanted)
    result = classification_pb2.ClassificationResult()
    count = len(examples)
    scores, classes = outputs.get("scores"), outputs.get("classes")
    for array in (scores, classes):
        if array is not None and (array.ndim != 2 or array.shape[0] != count):
            raise invalid_argument(
                f"Expected Tensor shape: [{count} num_classes] but got {list(array.shape)}")
    width = (scores if scores is not None else classes).shape[1]
    for row in range(count):
        classifications = result.classifications.add()
        for column in range(width):
            item = classifications.classes.add()
            if classes is not None:
                item.label = tensors.as_bytes(classes[row, column]).decode("utf-8", "replace")
            if scores is not None:
                item.score = float(scores[row, column])
    return name, result


def regress_result(loaded, signature_name: str, model_input,
                   not_found="No signature was found with the name: {}"):
    name, signature = _signature_for_method(loaded, signature_name, REGRESS_METHOD, not_found)
    examples = serialized_examples(model_input)
    if "outputs" not in signature.outputs:
        raise invalid_argument("Expected regression signature to have an output named 'outputs'")
    values = run_signature(loaded, signature, {"inputs": examples}, ["outputs"])["outputs"]
    count = len(examples)
    if values.shape not in ((count,), (count, 1)):
        raise invalid_argument(f"Expected output Tensor shape to be [{count}] or [{count},1] "
                               f"but got {list(values.shape)}")
    result = regression_pb2.RegressionResult()
    for value in values.reshape(-1):
        result.regressions.add().value = float(value)
    return name, result


def classify(loaded, request) -> classification_pb2.ClassificationResponse:
    name, result = classify_result(loaded, request.model_spec.signature_name, request.input)
    response = classification_pb2.ClassificationResponse(result=result)
    fill_model_spec(response.model_spec, loaded, name)
    return response


def regress(loaded, request) -> regression_pb2.RegressionResponse:
    name, result = regress_result(loaded, request.model_spec.signature_name, request.input)
    response = regression_pb2.RegressionResponse(result=result)
    fill_model_spec(response.model_spec, loaded, name)
    return response


def multi_inference(loaded, request) -> inference_pb2.MultiInferenceResponse:
    """Run every task on the same model version (the caller resolved the first task's spec)."""
    if not request.tasks:
        raise invalid_argument("MultiInferenceRequest must specify at least one task")
    seen = set()
    response = inference_pb2.MultiInferenceResponse()
    not_found = "Requested signature not found in model graph: {}"
    for task in request.tasks:
        if task.model_spec.name != request.tasks[0].model_spec.name:
            raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name in seen:
            raise invalid_argument(f"Duplicate evaluation of signature: {signature_name}")
        seen.add(signature_name)
        result = response.results.add()
        if task.method_name == CLASSIFY_METHOD:
            name, output = classify_result(loaded, signature_name, request.input, not_found)
            result.classification_result.CopyFrom(output)
        elif task.method_name == REGRESS_METHOD:
            name, output = regress_result(loaded, signature_name, request.input, not_found)
            result.regression_result.CopyFrom(output)
        else:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               f"Unsupported signature method_name: {task.method_name}")
        fill_model_spec(result.model_spec, loaded, name)
    return response


# ---------------- Metadata ----------------
def model_metadata(loaded, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != "signature_def":
            raise invalid_argument(f"Metadata field {field} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = loaded.name
    response.model_spec.version.value = loaded.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in loaded.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata["signature_def"].Pack(signature_map)
    return response


# ---------------- Warmup ----------------
def run_warmup(loaded, warmup_file: str, max_elements: int) -> int:
    """Replay a TFRecord of PredictionLogs against a loading version; any failure raises."""
    count = 0
    for record in tf.compat.v1.io.tf_record_iterator(warmup_file):
        count += 1
        if count > MAX_WARMUP_RECORDS:
            raise invalid_argument(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS})")
        log = prediction_log_pb2.PredictionLog.FromString(record)
        kind = log.WhichOneof("log_type")
        if kind == "predict_log":
            predict(loaded, log.predict_log.request, max_elements)
        elif kind == "classify_log":
            classify(loaded, log.classify_log.request)
        elif kind == "regress_log":
            regress(loaded, log.regress_log.request)
        elif kind == "multi_inference_log":
            multi_inference(loaded, log.multi_inference_log.request)
        else:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}")
    return count

