"""The gRPC client behind the CLI's generate, interpolate, status, metadata and evaluate commands.

It uses only the standard TF Serving stubs, so it works against this project's server and
against the real tensorflow_model_server. Every failure becomes a one-line `ClientError`.
TensorFlow protos are imported lazily so importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import numpy as np

from serving.config import MODEL_NAME as DEFAULT_MODEL

# Replies may be this large: 64 images are ~200 KB; room is left for larger batches.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),)
POLL_SECONDS = 0.2  # wait_until_available: how often a starting server is asked again
ASK_SECONDS = 1.0  # wait_until_available: the longest one server is waited for before the next is asked
STARTUP_GRACE_SECONDS = 3.0  # wait_until_available: how long NOT_FOUND may mean "still listing its versions"
_round_robin = itertools.count()
_round_robin_lock = threading.Lock()


class ClientError(Exception):
    """A one-line, user-facing description of a failed request; `code` is the gRPC status, if one came back."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def _servers(server: str) -> list[str]:
    servers = [item.strip() for item in server.split(",") if item.strip()]
    if not servers:
        raise ClientError(f"no server address given (got {server!r})")
    return servers


def _ordered(servers: list[str]) -> list[str]:
    with _round_robin_lock:
        start = next(_round_robin) % len(servers)
    return servers[start:] + servers[:start]


def _describe(error: grpc.RpcError, address: str, model_name: str) -> str:
    code, details = error.code(), (error.details() or "").splitlines()[0:1]
    detail = details[0] if details else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach digitgan server at {address} (is `python cli.py serve` running?)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"request to {address} timed out (deadline exceeded)"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"model {model_name!r} not found on {address}: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"invalid request: {detail}"
    return f"server error {code.name}: {detail}"


def _call(server: str, model_name: str, method: str, request, timeout: float, wait_for_ready: bool = False):
    """Send to each server in round-robin order, moving on when one is UNAVAILABLE.

    `wait_for_ready`: a server whose port is not open yet is waited for (within `timeout`), not refused.
    """
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    last_error = None
    for address in _ordered(_servers(server)):
        with grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS)) as channel:
            if method == "GetModelStatus":
                stub = model_service_pb2_grpc.ModelServiceStub(channel)
            else:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                return getattr(stub, method)(request, timeout=timeout, wait_for_ready=wait_for_ready)
            except grpc.RpcError as error:
                last_error = ClientError(_describe(error, address, model_name), error.code())
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise last_error from None
    raise last_error


def _model_spec(spec, model_name: str, version: int | None, signature_name: str = "") -> None:
    spec.name = model_name
    if signature_name:
        spec.signature_name = signature_name
    if version is not None:
        spec.version.value = int(version)


def generate(server: str, model_name: str = DEFAULT_MODEL, digits: list[int] | None = None, count: int = 16,
             seed: int = 0, version: int | None = None, timeout: float = 30.0,
             latent_dim: int | None = None) -> tuple[np.ndarray, int]:
    """Generate images; returns (float32 [N,28,28,1] in [0,1], version used).

    With `digits`, N = len(digits) * count via the `sample` signature (seeds seed, seed+1, ...);
    otherwise `count` images from `serving_default` with numpy normal noise from `seed`.
    """
    if count < 1:
        raise ClientError(f"count must be at least 1, got {count}")
    if digits:
        for digit in digits:
            if not 0 <= int(digit) <= 9:
                raise ClientError(f"digit must be in 0..9, got {digit}")
        # One request per digit, so a server list shares the work (each call starts at the next server).
        results = [predict(server, "sample", {"digit": np.full(count, digit, np.int32),
                                              "seed": np.arange(seed + index * count, seed + (index + 1) * count,
                                                                dtype=np.int64)},
                           model_name=model_name, version=version, timeout=timeout)
                   for index, digit in enumerate(digits)]
        return np.concatenate([images for images, _ in results]), results[0][1]
    if latent_dim is None:
        latent_dim = read_latent_dim(server, model_name, version, timeout)
    noise = np.random.default_rng(seed).standard_normal((count, latent_dim)).astype(np.float32)
    return predict(server, "serving_default", {"noise": noise}, model_name=model_name, version=version,
                   timeout=timeout)


def interpolate(server: str, model_name: str = DEFAULT_MODEL, digits: list[int] | None = None, steps: int = 10,
                seed: int = 0, version: int | None = None, timeout: float = 30.0) -> tuple[np.ndarray, int]:
    """A walk from one noise vector to another (seeded by `seed`), `steps` images per row.

    With `digits` (conditional models), one row per digit through the `conditional` signature, the
    same walk in every row; otherwise one row through `serving_default`. The walk is spherical
    (slerp), which keeps every point at the norm a standard normal draw would have.
    """
    if steps < 2:
        raise ClientError(f"an interpolation needs at least 2 steps, got {steps}")
    latent_dim = read_latent_dim(server, model_name, version, timeout)
    start, end = np.random.default_rng(seed).standard_normal((2, latent_dim))
    walk = np.stack([_slerp(start, end, fraction) for fraction in np.linspace(0.0, 1.0, steps)]).astype(np.float32)
    if not digits:
        return predict(server, "serving_default", {"noise": walk}, model_name=model_name, version=version,
                       timeout=timeout)
    noise = np.tile(walk, (len(digits), 1))
    digit_column = np.repeat(np.asarray(digits, np.int32), steps)
    return predict(server, "conditional", {"noise": noise, "digit": digit_column}, model_name=model_name,
                   version=version, timeout=timeout)


def _slerp(start: np.ndarray, end: np.ndarray, fraction: float) -> np.ndarray:
    cosine = np.dot(start, end) / (np.linalg.norm(start) * np.linalg.norm(end))
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))
    if angle < 1e-6:
        return (1.0 - fraction) * start + fraction * end
    return (np.sin((1.0 - fraction) * angle) * start + np.sin(fraction * angle) * end) / np.sin(angle)


def predict(server: str, signature_name: str, inputs: dict[str, np.ndarray], model_name: str = DEFAULT_MODEL,
            version: int | None = None, output: str = "images", timeout: float = 30.0) -> tuple[np.ndarray, int]:
    """One Predict call asking only for `output`; returns (that output as numpy, version used)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    _model_spec(request.model_spec, model_name, version, signature_name)
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.append(output)
    response = _call(server, model_name, "Predict", request, timeout)
    if output not in response.outputs:
        raise ClientError(f"model {model_name!r} returned no {output!r} output")
    return tf.make_ndarray(response.outputs[output]), response.model_spec.version.value


def read_latent_dim(server: str, model_name: str, version: int | None, timeout: float) -> int:
    """The length of the noise `serving_default` takes, from the model's metadata."""
    metadata = get_metadata(server, model_name, version, timeout)
    signature = metadata["signatures"].get("serving_default")
    if signature is None or "noise" not in signature["inputs"]:
        raise ClientError(f"model {model_name!r} has no serving_default signature with a 'noise' input")
    shape = signature["inputs"]["noise"]["shape"]
    if len(shape) != 2 or shape[1] < 1:
        raise ClientError(f"cannot tell the latent size from noise shape {shape}; pass latent_dim")
    return shape[1]


def wait_until_available(server: str, model_name: str = DEFAULT_MODEL, version: int | None = None,
                         timeout: float = 30.0) -> None:
    """Returns once `model_name` (`version`, if given) is AVAILABLE on one of the servers; ClientError after
    `timeout` seconds.

    A server that is still starting is waited for: its port not open yet, or its first version still
    loading, so `serve ... &` followed at once by `generate` works. Each server of a list is asked in
    turn, at most ASK_SECONDS at a time, so a dead one cannot use up the wait. A model the server does
    not know (NOT_FOUND) is an error at once, after a grace of STARTUP_GRACE_SECONDS from the server's
    first answer (a server that has just opened its port may not have listed its versions yet).
    """
    deadline = time.monotonic() + timeout
    first_answer = None  # when a server first answered at all
    last = f"cannot reach digitgan server at {server} within {timeout:g} s (is `python cli.py serve` running?)"
    while True:
        for address in _servers(server):
            ask = min(ASK_SECONDS, deadline - time.monotonic())
            if ask <= 0:
                break
            try:
                versions = get_status(address, model_name, version, timeout=ask, wait_for_ready=True)
            except ClientError as error:
                if error.code == grpc.StatusCode.NOT_FOUND:
                    first_answer = first_answer or time.monotonic()
                    if time.monotonic() - first_answer > STARTUP_GRACE_SECONDS:
                        raise
                    last = str(error)
                elif error.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                continue  # NOT_FOUND in the grace, or not reachable: keep the last answer, ask the next server
            if any(entry["state"] == "AVAILABLE" for entry in versions):
                return
            first_answer = first_answer or time.monotonic()
            last = "state " + ", ".join(f"v{entry['version']} {entry['state']}" for entry in versions)
        if time.monotonic() >= deadline:
            raise ClientError(last if first_answer is None else
                              f"model {model_name!r} is not available on {server} after {timeout:g} s ({last})")
        time.sleep(POLL_SECONDS)


def get_status(server: str, model_name: str = DEFAULT_MODEL, version: int | None = None,
               timeout: float = 10, wait_for_ready: bool = False) -> list[dict]:
    """One dict per version: version, state name, error code name, error message."""
    from tensorflow_serving.apis import get_model_status_pb2

    request = get_model_status_pb2.GetModelStatusRequest()
    _model_spec(request.model_spec, model_name, version)
    response = _call(server, model_name, "GetModelStatus", request, timeout, wait_for_ready)
    states = get_model_status_pb2.ModelVersionStatus.State
    return [{"version": item.version, "state": states.Name(item.state),
             "error_code": _code_name(item.status.error_code),
             "error_message": item.status.error_message}
            for item in response.model_version_status]


def _code_name(number: int) -> str:
    """The status code's name ("OK" for 0), or the number itself where no code has it."""
    return next((code.name for code in grpc.StatusCode if code.value[0] == number), str(number))


def get_metadata(server: str, model_name: str = DEFAULT_MODEL, version: int | None = None,
                 timeout: float = 10) -> dict:
    """{"version": int, "signatures": {name: {"method_name", "inputs", "outputs"}}}; dims -1 if unknown."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    _model_spec(request.model_spec, model_name, version)
    response = _call(server, model_name, "GetModelMetadata", request, timeout)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)

    def describe(tensors):
        return {alias: {"dtype": types_pb2.DataType.Name(info.dtype),
                        "shape": None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]}
                for alias, info in sorted(tensors.items())}

    signatures = {name: {"method_name": sig.method_name, "inputs": describe(sig.inputs),
                         "outputs": describe(sig.outputs)}
                  for name, sig in sorted(signature_map.signature_def.items())}
    return {"version": response.model_spec.version.value, "signatures": signatures}
