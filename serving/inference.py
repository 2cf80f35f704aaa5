"""Request handling shared by gRPC, REST and warmup: Predict, Classify, Regress,
MultiInference and GetModelMetadata against one loaded version.

The checks and messages follow TF Serving's predict_util.cc, classifier.cc, regressor.cc
and get_model_metadata_impl.cc, so clients see the same status codes and texts.
"""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, inference_pb2,
                                     predict_pb2, prediction_log_pb2, regression_pb2)

from serving import errors, tensors
from serving.errors import ServingError, invalid_argument

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
MAX_WARMUP_RECORDS = 1000  # WarmupConsts::kMaxNumRecords


def run_signature(loaded, signature, feeds: dict, output_aliases: list[str], timeout_in_ms: int = 0) -> dict:
    """Run a SignatureDef on alias -> array feeds; returns alias -> array for the outputs.

    A run longer than timeout_in_ms (0: no limit) fails with DEADLINE_EXCEEDED.
    """
    feeds_by_name = {signature.inputs[alias].name: value for alias, value in feeds.items()}
    fetch_names = [signature.outputs[alias].name for alias in output_aliases]
    try:
        results = loaded.run(feeds_by_name, fetch_names, timeout_in_ms)
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
    """The request's input aliases against the signature, as predict_util.cc's
    VerifyRequestInputsSize and then saved_model::GetInputValues check them: an input the
    request leaves out needs a default in the signature (SignatureDef.defaults)."""
    expected, sent_set, defaults = set(signature.inputs), set(sent), set(signature.defaults)
    if len(sent) > len(expected) or (len(sent) < len(expected) and not defaults):
        extra = sorted(sent_set - expected)
        missing = sorted(expected - sent_set)
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.")
    missing = sorted(expected - sent_set - defaults)
    if missing:
        alias = missing[0]
        raise invalid_argument(
            f"Signature input alias: {alias}(feed name: {signature.inputs[alias].name}) not found in request "
            f"and no default value provided. Inputs expected to be in the request {{{','.join(sorted(sent))}}}, "
            f"or default input alias set: {','.join(sorted(defaults))}")
    used = sent_set & expected
    if len(used) != len(sent_set):
        raise invalid_argument(f"Inputs contains invalid name. Used request inputs: {','.join(sorted(used))}, "
                               f"request input: {','.join(sorted(sent))}")


def verify_signature_method(loaded, signature) -> None:
    """predict_util.cc's VerifySignature: with --enable_signature_method_name_check, Predict runs
    only predict, classify and regress signatures."""
    if loaded.method_name_check and signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
        raise ServingError(grpc.StatusCode.INTERNAL,
                           f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                           f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}")


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


def parse_inputs(request_inputs, max_elements: int, signature=None) -> dict:
    """alias -> array for a request's input map, with the total element limit enforced; with a
    signature, its defaults fill the inputs the request leaves out (GetInputValues)."""
    feeds = {}
    remaining = max_elements
    protos = dict(request_inputs)
    if signature is not None:
        protos.update({alias: signature.defaults[alias] for alias in signature.defaults
                       if alias in signature.inputs and alias not in request_inputs})
    for alias in sorted(protos):
        try:
            array = tensors.proto_to_ndarray(protos[alias], remaining)
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
    verify_signature_method(loaded, signature)
    check_input_aliases(signature, input_aliases)
    return signature_name, signature, output_aliases_for(signature, output_filter)


def predict(loaded, request: predict_pb2.PredictRequest, max_elements: int,
            runner=None) -> predict_pb2.PredictResponse:
    """TF Serving's Predict on one loaded version. `runner` may batch (see batching.py).

    Outputs are sent in the typed `*_val` fields, as TF Serving sends them.
    """
    signature_name, signature, output_aliases = _predict_plan(
        loaded, request.model_spec.signature_name, list(request.inputs), request.output_filter)
    feeds = parse_inputs(request.inputs, max_elements, signature)
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
    """The signature Classify / Regress runs, checked as classifier.cc / regressor.cc check it:
    its method_name only with --enable_signature_method_name_check, its inputs and outputs always
    (PreProcessClassification / PreProcessRegression)."""
    name = signature_name or DEFAULT_SIGNATURE
    signature = loaded.signature_defs.get(name)
    if signature is None:
        raise invalid_argument(not_found_message.format(name))
    kind = "classification" if method == CLASSIFY_METHOD else "regression"
    if loaded.method_name_check and signature.method_name != method:
        raise invalid_argument(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if method == CLASSIFY_METHOD and len(signature.outputs) not in (1, 2):
        raise invalid_argument(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if method == REGRESS_METHOD and len(signature.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    if "inputs" not in signature.inputs:
        raise invalid_argument(f"No {kind} inputs found in SignatureDef: {_debug_string(signature)}")
    if method == CLASSIFY_METHOD and not {"classes", "scores"} & set(signature.outputs):
        raise invalid_argument('Expected classification signature outputs to contain at least one of "classes" or '
                               f'"scores". Signature was: {_debug_string(signature)}')
    if method == REGRESS_METHOD and "outputs" not in signature.outputs:
        raise invalid_argument(f"No regression outputs found in SignatureDef: {_debug_string(signature)}")
    return name, signature


def _debug_string(message) -> str:
    return text_format.MessageToString(message)


def _shape_text(array) -> str:
    """TensorShape::DebugString: [d0,d1]."""
    return "[" + ",".join(str(size) for size in array.shape) + "]"


def classify_result(loaded, signature_name: str, model_input,
                    not_found="No signature was found with the name: {}", timeout_in_ms: int = 0):
    name, signature = _signature_for_method(loaded, signature_name, CLASSIFY_METHOD, not_found)
    examples = serialized_examples(model_input)
    wanted = [alias for alias in ("classes", "scores") if alias in signature.outputs]
    outputs = run_signature(loaded, signature, {"inputs": examples}, wanted, timeout_in_ms)
    count = len(examples)
    scores, classes = outputs.get("scores"), outputs.get("classes")
    # PostProcessClassificationResult's checks, in its order.
    for alias, array, dtype in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
        if array is None:
            continue
        if array.ndim != 2:
            raise invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {_shape_text(array)}")
        actual = tensors.dtype_name(tensors.dtype_enum_of(array))
        if actual != dtype:
            raise invalid_argument(f"Expected {alias} Tensor of {dtype}. Got: {actual}")
        if array.shape[0] != count:
            raise invalid_argument(f"Expected {alias} output batch size of {count}. Got: {array.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid_argument(f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. "
                               f"{scores.shape[1]}")
    result = classification_pb2.ClassificationResult()
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
                   not_found="No signature was found with the name: {}", timeout_in_ms: int = 0):
    name, signature = _signature_for_method(loaded, signature_name, REGRESS_METHOD, not_found)
    examples = serialized_examples(model_input)
    values = run_signature(loaded, signature, {"inputs": examples}, ["outputs"], timeout_in_ms)["outputs"]
    count = len(examples)
    # PostProcessRegressionResult's checks, in its order.
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise invalid_argument("Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                               f"{_shape_text(values)}")
    if values.shape[0] != count:
        raise invalid_argument(f"Input batch size did not match output batch size: {count} vs. {values.shape[0]}")
    if values.dtype != np.float32:
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: "
                               f"{tensors.dtype_name(tensors.dtype_enum_of(values))}")
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
def check_metadata_fields(request) -> None:
    """ValidateGetModelMetadataRequest: at least one field, and only signature_def."""
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != "signature_def":
            raise invalid_argument(f"Metadata field {field} is not supported")


def model_metadata(loaded, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
    check_metadata_fields(request)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = loaded.name
    response.model_spec.version.value = loaded.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in loaded.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata["signature_def"].Pack(signature_map)
    return response


# ---------------- Warmup ----------------
def run_warmup(loaded, warmup_file: str, max_elements: int, iterations: int = 1) -> int:
    """Replay a TFRecord of PredictionLogs against a loading version, each record `iterations`
    times (--num_request_iterations_for_warmup); any failure raises. Returns the records read."""
    count = 0
    for record in tf.compat.v1.io.tf_record_iterator(warmup_file):
        log = prediction_log_pb2.PredictionLog.FromString(record)
        kind = log.WhichOneof("log_type")
        for _ in range(iterations):
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
        count += 1
        if count > MAX_WARMUP_RECORDS:
            raise invalid_argument(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS})")
    return count
