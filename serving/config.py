"""Configuration of the digitgan model server (the serving half of the project).

`ServeConfig` mirrors the `tensorflow_model_server` flags the project uses, so the same
settings can drive the builtin Python server or the real TF Serving binary.
"""

from __future__ import annotations

import dataclasses

MEBIBYTE = 1024 * 1024
ENGINES = ("builtin", "tfserving")


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
        rest_port: REST port; 0 picks a free port, -1 turns REST off.
        poll_seconds: how often the version directories are re-scanned
            (`--file_system_poll_wait_seconds`); 0 scans once at start.
        enable_batching: turn on server-side batching of concurrent Predict calls.
        max_batch_size: largest batch (in examples along dim 0) a batch may hold.
        batch_timeout_micros: how long a partial batch waits for more requests.
        max_enqueued_batches: batches that may wait per queue before UNAVAILABLE.
        num_batch_threads: threads running batches in parallel.
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
    """

    model_base_path: str = "models/digitgan"
    model_name: str = "digitgan"
    model_config_file: str | None = None
    host: str = "127.0.0.1"
    port: int = 8500
    rest_port: int = 8501
    poll_seconds: float = 1.0
    enable_batching: bool = False
    max_batch_size: int = 64
    batch_timeout_micros: int = 2000
    max_enqueued_batches: int = 64
    num_batch_threads: int = 1
    max_request_elements: int = 1_000_000
    max_message_bytes: int = 64 * MEBIBYTE
    max_concurrent_rpcs: int = 256
    max_concurrent_rest_requests: int = 256
    grace_seconds: float = 10.0
    engine: str = "builtin"
    monitoring_config_file: str | None = None

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
        if self.port != 0 and self.port == self.rest_port:
            raise ValueError(f"rest_port must differ from port, both are {self.port!r}")
        if not self.poll_seconds >= 0:
            raise ValueError(f"poll_seconds must be >= 0, got {self.poll_seconds!r}")
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads",
                     "max_request_elements", "max_message_bytes", "max_concurrent_rpcs",
                     "max_concurrent_rest_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.batch_timeout_micros, bool) or not isinstance(self.batch_timeout_micros, int) \
                or self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must be an integer >= 0, got {self.batch_timeout_micros!r}")
        if self.max_message_bytes > 2**31 - 1:
            raise ValueError(f"max_message_bytes must be below 2 GiB, got {self.max_message_bytes!r}")
        if not self.grace_seconds >= 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.monitoring_config_file is not None and not self.monitoring_config_file:
            raise ValueError(f"monitoring_config_file must be a path or None, got {self.monitoring_config_file!r}")


def _check_port(name: str, value: int, allow_off: bool) -> None:
    lowest = -1 if allow_off else 0
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= 65535:
        extra = ", or -1 to turn it off" if allow_off else ""
        raise ValueError(f"{name} must be 0..65535 (0 picks a free port{extra}), got {value!r}")
