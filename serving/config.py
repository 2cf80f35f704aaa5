"""Configuration of the digitgan model server (the serving half of the project), and the
defaults its clients share.

`ServeConfig` mirrors the `tensorflow_model_server` flags the project uses, so the same
settings can drive the builtin Python server or the real TF Serving binary. Every serving
default lives here once: `cli.py` reads its `serve` options from `ServeConfig()` and its
client options (`--server`, `--model-name`) from the constants below, as do the client, the
load generator and the benches. No TensorFlow, no grpc: the CLI imports this at start-up.
"""

from __future__ import annotations

import dataclasses

MEBIBYTE = 1024 * 1024
MODEL_NAME = "digitgan"
MODEL_BASE_PATH = "models/digitgan"  # where `cli.py export` writes versions and `serve` looks for them
GRPC_PORT = 8500  # tensorflow_model_server's --port default
REST_PORT = 8501  # the port TF Serving's documentation and images use for --rest_api_port
SERVER = f"localhost:{GRPC_PORT}"  # what clients dial by default
ENGINES = ("builtin", "tfserving")
# rest_port=FREE_PORT asks the operating system for a free REST port (tests, benches); the CLI
# does not offer it, because `--rest_api_port=0` means "no REST" in tensorflow_model_server.
FREE_PORT = -1
BATCHING_KNOBS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings for one model server process.

    Attributes:
        model_base_path: directory holding numeric version subdirectories (TF Serving's
            `--model_base_path`); made absolute before use.
        model_name: name clients put in `ModelSpec.name` (`--model_name`).
        model_config_file: path to a text-format `ModelServerConfig`
            (`--model_config_file`); when set, `model_base_path` and `model_name` are ignored.
        host: interface to bind; loopback by default, "0.0.0.0" exposes the server.
        port: gRPC port; 0 picks a free port (see `ModelServer.grpc_port`).
        rest_port: REST port; 0 turns REST off (TF Serving's `--rest_api_port=0`), FREE_PORT
            (-1, for tests) picks a free port (see `ModelServer.rest_port`).
        poll_seconds: how often the version directories are re-scanned
            (`--file_system_poll_wait_seconds`); 0 scans once at start.
        enable_batching: turn on server-side batching of concurrent Predict calls.
        batching_parameters_file: text-format `BatchingParameters` file
            (`--batching_parameters_file`); only with enable_batching, as in TF Serving.
        max_batch_size: largest batch (in examples along dim 0) a batch may hold.
        batch_timeout_micros: how long a partial batch waits for more requests.
        max_enqueued_batches: batches that may wait per queue before UNAVAILABLE.
        num_batch_threads: threads running batches in parallel.
            These four are None unless set here (not with batching_parameters_file): unset, each
            takes the file's value or TF's default (`serving.batching.TF_DEFAULTS`: 1000, 0, 10,
            the CPU count).
        max_request_elements: total tensor elements allowed in one request; checked before
            any array is allocated.
        max_message_bytes: gRPC send/receive message limit and REST body limit, in bytes.
        max_concurrent_rpcs: concurrent gRPC calls served before RESOURCE_EXHAUSTED.
        max_concurrent_rest_requests: concurrent REST inference POSTs (`:predict`, `:classify`,
            `:regress`) served before HTTP 429 `{"error": ...}`; extra ones are refused, not
            queued. Status, metadata and metrics GETs are not counted, so probes keep working.
        grace_seconds: how long `stop()` lets in-flight requests finish.
        engine: "builtin" (this Python server) or "tfserving" (exec `tensorflow_model_server`).
        monitoring_config_file: path to a text-format `MonitoringConfig`
            (`--monitoring_config_file`); Prometheus metrics are served on the REST port at its
            `prometheus_config.path` only when it sets `enable: true`. None: no metrics page.
        rest_api_enable_cors_support: TF Serving's `--rest_api_enable_cors_support`: every reply
            under `/v1/` carries `Access-Control-Allow-Origin: *` (and the allowed methods and
            headers), so pages on other origins can call the REST API.
    """

    model_base_path: str = MODEL_BASE_PATH
    model_name: str = MODEL_NAME
    model_config_file: str | None = None
    host: str = "127.0.0.1"
    port: int = GRPC_PORT
    rest_port: int = REST_PORT
    poll_seconds: float = 1.0
    enable_batching: bool = False
    batching_parameters_file: str | None = None
    max_batch_size: int | None = None
    batch_timeout_micros: int | None = None
    max_enqueued_batches: int | None = None
    num_batch_threads: int | None = None
    max_request_elements: int = 1_000_000
    max_message_bytes: int = 64 * MEBIBYTE
    max_concurrent_rpcs: int = 256
    max_concurrent_rest_requests: int = 256
    grace_seconds: float = 10.0
    engine: str = "builtin"
    monitoring_config_file: str | None = None
    rest_api_enable_cors_support: bool = False

    def __post_init__(self) -> None:
        if self.model_config_file is None:
            if not self.model_base_path:
                raise ValueError(f"model_base_path must not be empty, got {self.model_base_path!r}")
            if not self.model_name or "/" in self.model_name:
                raise ValueError(f"model_name must be a non-empty name without '/', got {self.model_name!r}")
        elif not self.model_config_file:
            raise ValueError(f"model_config_file must be a path or None, got {self.model_config_file!r}")
        if not self.host:
            raise ValueError(f"host must not be empty, got {self.host!r}")
        _check_port("port", self.port, allow_off=False)
        _check_port("rest_port", self.rest_port, allow_off=True)
        if self.port > 0 and self.port == self.rest_port:
            raise ValueError(f"rest_port must differ from port, both are {self.port!r}")
        if not self.poll_seconds >= 0:
            raise ValueError(f"poll_seconds must be >= 0, got {self.poll_seconds!r}")
        for name in ("max_request_elements", "max_message_bytes", "max_concurrent_rpcs",
                     "max_concurrent_rest_requests"):
            _check_integer(name, getattr(self, name), lowest=1)
        self._check_batching()
        if self.max_message_bytes > 2**31 - 1:
            raise ValueError(f"max_message_bytes must be below 2 GiB, got {self.max_message_bytes!r}")
        if not self.grace_seconds >= 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.monitoring_config_file is not None and not self.monitoring_config_file:
            raise ValueError(f"monitoring_config_file must be a path or None, got {self.monitoring_config_file!r}")
        if not isinstance(self.rest_api_enable_cors_support, bool):
            raise ValueError(f"rest_api_enable_cors_support must be True or False, got "
                             f"{self.rest_api_enable_cors_support!r}")


    def _check_batching(self) -> None:
        for name in BATCHING_KNOBS:
            value = getattr(self, name)
            if value is not None:
                _check_integer(name, value, lowest=0 if name == "batch_timeout_micros" else 1)
        if self.batching_parameters_file is not None:
            if not self.enable_batching:
                # tensorflow_model_server refuses this combination too (server.cc).
                raise ValueError("batching_parameters_file is set without setting enable_batching to true")
            if not self.batching_parameters_file:
                raise ValueError(f"batching_parameters_file must be a path or None, got {self.batching_parameters_file!r}")
            given = [name for name in BATCHING_KNOBS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"give the batching knobs either in batching_parameters_file or as settings, "
                                 f"not both (also set: {', '.join(given)})")

    def batching_knobs(self) -> dict[str, int]:
        """The batching knobs set in this config (not the file's, not TF's defaults)."""
        return {name: getattr(self, name) for name in BATCHING_KNOBS if getattr(self, name) is not None}


def _check_integer(name: str, value, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        kind = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_port(name: str, value: int, allow_off: bool) -> None:
    if allow_off:  # REST: 0 is off, FREE_PORT picks one
        if isinstance(value, bool) or not isinstance(value, int) or not FREE_PORT <= value <= 65535:
            raise ValueError(f"{name} must be 0..65535 (0 turns REST off), or FREE_PORT ({FREE_PORT}) to pick "
                             f"a free port, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be 0..65535 (0 picks a free port), got {value!r}")
