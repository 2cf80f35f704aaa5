"""The model server process: gRPC (+ health, reflection), REST, model manager, batching.

`create_server(config)` builds a `ModelServer`; `run_server(config)` runs one until SIGTERM or
SIGINT. With `engine="tfserving"` the real `tensorflow_model_server` is exec'd instead,
with the equivalent flags.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (model_service_pb2, model_service_pb2_grpc, prediction_service_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from serving import (batching, http_server, inference, ports, prediction, rest_api, v2_grpc, v2_inference,
                     v2_rest)
from serving.batching import Batcher
from serving.config import FREE_PORT, ServeConfig
from serving.manager import ModelManager, discover_versions, single_model_config
from serving.metrics import Metrics, prometheus_path
from serving.request_runner import RequestRunner

LOG = logging.getLogger("serving.server")
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
INFERENCE_SERVICE = v2_grpc.SERVICE_NAME  # the Open Inference Protocol's
# "" is the whole server; the short names are the ones TF Serving itself marks.
HEALTH_SERVICE_NAMES = ("", PREDICTION_SERVICE, MODEL_SERVICE, "PredictionService", "ModelService", INFERENCE_SERVICE)
# Refused while stopping; health (then NOT_SERVING) and reflection keep answering.
REFUSED_WHILE_STOPPING = (f"/{PREDICTION_SERVICE}/", f"/{MODEL_SERVICE}/", f"/{INFERENCE_SERVICE}/")
# stop() keeps serving this long after health turns NOT_SERVING (at most half the grace period):
# calls already queued in the gRPC core when the signal came are served rather than refused,
# and health-checking balancers get time to stop sending.
KEEP_SERVING_SECONDS = 0.5
# stop() closes the gRPC core only once no call has arrived for this long: the core cancels a
# call that races its shutdown (CANCELLED, grpc/grpc#41785) where we want a clean UNAVAILABLE.
QUIET_SECONDS = 0.2


def load_server_config(config: ServeConfig) -> model_server_config_pb2.ModelServerConfig:
    """The ModelServerConfig from the config file, or a one-model config from name/base path."""
    if config.model_config_file is None:
        return single_model_config(config.model_name, config.model_base_path)
    try:
        with open(config.model_config_file, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read model_config_file {config.model_config_file!r}: {error}") from None
    try:
        return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        raise ValueError(f"Error parsing text-format tensorflow.serving.ModelServerConfig in "
                         f"{config.model_config_file!r}: {error}") from None


class TrackingThreadPool(futures.ThreadPoolExecutor):
    """The gRPC worker pool, counting accepted calls that have not finished yet.

    gRPC submits every accepted call here, including calls still queued for a worker, so
    "nothing unfinished" means nothing is in flight.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = ""):
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._activity = threading.Condition()
        self._unfinished = 0
        self._last_submitted = time.monotonic()

    def submit(self, fn, /, *args, **kwargs):
        with self._activity:
            self._unfinished += 1
            self._last_submitted = time.monotonic()
        try:
            return super().submit(self._run_counted, fn, *args, **kwargs)
        except BaseException:
            self._finished()
            raise

    def _run_counted(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._activity:
            self._unfinished -= 1
            self._activity.notify_all()

    def wait_quiet(self, quiet_seconds: float, deadline: float) -> bool:
        """Wait until every call has finished and none arrived for quiet_seconds (False: deadline)."""
        with self._activity:
            while True:
                now = time.monotonic()
                quiet_at = self._last_submitted + quiet_seconds
                if self._unfinished == 0 and now >= quiet_at:
                    return True
                if now >= deadline:
                    return False
                # A finishing call notifies; a new call only moves quiet_at, seen on the next pass.
                self._activity.wait((deadline if self._unfinished else min(quiet_at, deadline)) - now)


class RefuseWhenStopping(grpc.ServerInterceptor):
    """After refuse_new_calls(), answers new model calls UNAVAILABLE instead of running them.

    gRPC runs interceptors when it accepts a call, before the call waits for a worker, so a
    call accepted earlier is in flight and still runs to completion.
    """

    def __init__(self):
        self._refusing = threading.Event()

    def refuse_new_calls(self) -> None:
        self._refusing.set()

    def intercept_service(self, continuation, handler_call_details):
        if self._refusing.is_set() and handler_call_details.method.startswith(REFUSED_WHILE_STOPPING):
            return _REFUSAL
        return continuation(handler_call_details)


def _refuse(_request: bytes, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")


_REFUSAL = grpc.unary_unary_rpc_method_handler(_refuse)  # no deserializer: the body is never parsed


class ModelServer:
    """One server: call start(), then wait_until_ready(), and stop() when done."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        # Read before anything binds a port, so a bad file fails cleanly.
        self.prometheus_path = prometheus_path(config.monitoring_config_file)
        self.health = health.HealthServicer()
        for name in HEALTH_SERVICE_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._stopped = False
        self._ready = threading.Event()
        self.manager = ModelManager(
            load_server_config(config), config.poll_seconds,
            warmup=lambda loaded, path: inference.run_warmup(loaded, path, config.max_request_elements),
            on_change=self._models_changed)
        self.batcher = None
        if config.enable_batching:
            options = batching.resolve_options(config.batching_parameters_file, **config.batching_knobs())
            self.batcher = Batcher(options.max_batch_size, options.batch_timeout_micros,
                                   options.max_enqueued_batches, options.num_batch_threads)
        # The Open Inference Protocol beside TF Serving's API, on the same ports and the same models.
        self.v2_models = v2_inference.V2Models(self.manager, config.max_request_elements, self.batcher,
                                               stopping=lambda: self._stopped)
        self._grpc_server = self._build_grpc_server()
        self._rest_server = None
        # REST binds first: a REST socket can be closed again if gRPC's port is taken, while a
        # gRPC server that never started keeps its port until it is garbage collected.
        try:
            if config.rest_port != 0:  # 0: no REST, as tensorflow_model_server's --rest_api_port=0
                api = rest_api.RestApi(self.manager, self.metrics, config.max_request_elements, self.batcher,
                                       self.prometheus_path, cors=config.rest_api_enable_cors_support,
                                       v2=v2_rest.V2RestApi(self.v2_models, self.metrics))
                rest_port = 0 if config.rest_port == FREE_PORT else config.rest_port
                self._rest_server = http_server.RestServer(api, config.host, rest_port, config.max_message_bytes,
                                                           config.max_concurrent_rest_requests)
            self._grpc_port = self._bind_grpc()
        except BaseException:  # give back what was taken: the REST port and the batch threads
            if self._rest_server is not None:
                self._rest_server.close()
            if self.batcher is not None:
                self.batcher.stop()
            raise

    def _bind_grpc(self) -> int:
        """The gRPC port, bound; ValueError naming the port when it is taken or cannot be bound."""
        host, port = self.config.host, self.config.port
        ports.check_free("gRPC", host, port, "--port")
        try:
            bound = self._grpc_server.add_insecure_port(f"{_host_for_grpc(host)}:{port}")
        except RuntimeError:  # grpcio raises where older versions returned 0
            bound = 0
        if bound == 0:
            raise ValueError(f"cannot listen on {host}:{port} for gRPC (is the port taken, or {host} not an "
                             f"address of this machine?); choose another with --port or --host")
        return bound

    def _build_grpc_server(self) -> grpc.Server:
        options = [("grpc.max_send_message_length", self.config.max_message_bytes),
                   ("grpc.max_receive_message_length", self.config.max_message_bytes), *ports.GRPC_SERVER_OPTIONS]
        # Enough workers that batched requests can wait together; the limit sheds the rest.
        workers = min(self.config.max_concurrent_rpcs, max(32, 4 * (os.cpu_count() or 1)))
        self._thread_pool = TrackingThreadPool(max_workers=workers, thread_name_prefix="grpc")
        self._stopping = RefuseWhenStopping()
        server = grpc.server(self._thread_pool, interceptors=[self._stopping], options=options,
                             maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        runner = RequestRunner(self.manager, self.metrics)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            prediction.PredictionService(runner, self.config.max_request_elements, self.batcher), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(prediction.ModelService(runner), server)
        v2_grpc.add_to_server(self.v2_models, runner, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        service_names = (PREDICTION_SERVICE, MODEL_SERVICE, INFERENCE_SERVICE,
                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(service_names, server)
        return server

    @property
    def grpc_port(self) -> int:
        return self._grpc_port

    @property
    def rest_port(self) -> int | None:
        return self._rest_server.port if self._rest_server is not None else None

    def start(self) -> None:
        self._grpc_server.start()
        if self._rest_server is not None:
            self._rest_server.start()
        self.manager.start()

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """True once every configured model has an available version (False on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.manager.all_models_available():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._ready.wait(0.05 if remaining is None else min(0.05, remaining))
        return True

    def _models_changed(self) -> None:
        if self._stopped:
            return
        status = (health_pb2.HealthCheckResponse.SERVING if self.manager.has_available_version()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in HEALTH_SERVICE_NAMES:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight calls finish, then unload.

        After KEEP_SERVING_SECONDS, new model calls get UNAVAILABLE from us while accepted ones
        finish; the gRPC core is closed once calls stop arriving (or the grace period ends), so
        that clients see a refusal rather than the core's CANCELLED for calls that race its
        shutdown. Everything is bounded by the grace period.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        started = time.monotonic()
        deadline = started + grace
        self.health.enter_graceful_shutdown()
        if self._rest_server is not None:
            self._rest_server.stop()
        time.sleep(max(0.0, started + min(KEEP_SERVING_SECONDS, grace / 2) - time.monotonic()))
        self._stopping.refuse_new_calls()
        self._thread_pool.wait_quiet(QUIET_SECONDS, deadline)
        self._grpc_server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.batcher is not None:
            self.batcher.stop()
        self.manager.stop()


def _host_for_grpc(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def create_server(config: ServeConfig) -> ModelServer:
    """Build (but do not start) a model server for `config`."""
    return ModelServer(config)


def run_server(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT, then stop gracefully; returns the exit code."""
    if config.engine == "tfserving":
        exec_tfserving(config)
    server = create_server(config)
    server.start()
    print(f"gRPC listening on {config.host}:{server.grpc_port}", flush=True)
    if server.rest_port is not None:
        print(f"REST listening on {config.host}:{server.rest_port}", flush=True)
        print(f"playground page at http://{_host_for_grpc(config.host)}:{server.rest_port}/", flush=True)
        if server.prometheus_path is not None:
            print(f"Prometheus metrics at {server.prometheus_path} on the REST port", flush=True)
    for line in missing_version_lines(server.manager.base_paths()):
        print(line, flush=True)
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Keep honouring SIGTERM while models load (a model may never appear).
        while not server.wait_until_ready(timeout=0.5) and not stop_requested.is_set():
            pass
        for name, versions in server.manager.available_models().items():
            print(f"model {name}: versions {versions or 'none loaded yet'}", flush=True)
        while not stop_requested.wait(0.5):
            pass
    finally:
        print("stopping", flush=True)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def missing_version_lines(base_paths: dict[str, str]) -> list[str]:
    """One line per model whose base path holds no version yet: where we look, how to make one.

    The server waits for a version as tensorflow_model_server does ("No versions of servable
    ... found under base path ..."); this says what to do about it.
    """
    lines = []
    for name, base_path in base_paths.items():
        if not discover_versions(base_path):
            lines.append(f"model {name}: no version under {base_path} yet (a version is a numeric folder such as "
                         f"{os.path.join(base_path, '1')}); waiting for one. Make one with `python cli.py export "
                         f"--model-base-path {base_path}`, or serve the published weights with "
                         f"`python cli.py serve --pretrained`.")
    return lines


# ---------------- the real tensorflow_model_server ----------------
def tfserving_command(config: ServeConfig, batching_file: str | None = None) -> list[str]:
    """tensorflow_model_server flags equivalent to `config`."""
    binary = shutil.which("tensorflow_model_server")
    if binary is None:
        raise ValueError("tensorflow_model_server is not on PATH; install TensorFlow Serving "
                         "(apt package tensorflow-model-server or the tensorflow/serving Docker image) "
                         "or use engine 'builtin'")
    if config.port == 0 or config.rest_port == FREE_PORT:
        raise ValueError("engine 'tfserving' cannot pick free ports: give explicit port and rest_port")
    command = [binary, f"--port={config.port}",
               f"--rest_api_port={config.rest_port}",  # 0 means REST off in both servers
               f"--file_system_poll_wait_seconds={int(round(config.poll_seconds))}"]
    if config.model_config_file is not None:
        command.append(f"--model_config_file={os.path.abspath(config.model_config_file)}")
    else:
        command += [f"--model_name={config.model_name}",
                    f"--model_base_path={os.path.abspath(config.model_base_path)}"]
    if config.enable_batching:
        command.append("--enable_batching=true")
        if batching_file is not None:
            command.append(f"--batching_parameters_file={batching_file}")
    if config.monitoring_config_file is not None:
        command.append(f"--monitoring_config_file={os.path.abspath(config.monitoring_config_file)}")
    if config.rest_api_enable_cors_support:
        command.append("--rest_api_enable_cors_support=true")
    return command


def batching_parameters_text(config: ServeConfig) -> str:
    """A text-format BatchingParameters with the knobs `config` sets (one `name { value: N }` a line)."""
    return "".join(f"{name} {{ value: {value} }}\n" for name, value in config.batching_knobs().items())


def exec_tfserving(config: ServeConfig) -> None:
    """Replace this process with tensorflow_model_server (never returns on success)."""
    batching_file = None
    if config.batching_parameters_file is not None:
        batching.read_batching_parameters_file(config.batching_parameters_file)  # a bad file: our clear error
        batching_file = os.path.abspath(config.batching_parameters_file)
    elif config.enable_batching and config.batching_knobs():
        handle, batching_file = tempfile.mkstemp(prefix="batching_parameters_", suffix=".txt")
        with os.fdopen(handle, "w") as file:
            file.write(batching_parameters_text(config))
    command = tfserving_command(config, batching_file)
    print("exec " + " ".join(command), flush=True)
    sys.stdout.flush()
    os.execv(command[0], command)
