"""Prometheus metrics with TF Serving's names, shared by the gRPC and REST paths.

`:tensorflow:serving:request_count{model_name,status}` counts every inference RPC and every
REST request under `/v1/` (status and metadata GETs and malformed requests too), with the
gRPC code the request ended with; `:tensorflow:serving:request_latency{model_name,API,entrypoint}`
is a microsecond histogram of the successful ones, with TF Serving's 33 buckets 10 * 1.8**k
(tensorflow_serving/servables/tensorflow/util.cc). The page is written as TF Serving's
util/prometheus_exporter.cc writes it: bucket bounds and sums in absl::StrCat's six significant
digits (`le="10"`, `le="32.4"`), values counted as TF's Histogram does (a value equal to a
bound falls in the next bucket).

The page is served only when a `MonitoringConfig` (`--monitoring_config_file`) enables it,
at its `prometheus_config.path` (default `/monitoring/prometheus/metrics`), as TF Serving does.
"""

from __future__ import annotations

import bisect
import threading

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


def _exponential_buckets(scale: float, growth_factor: float, count: int) -> list[float]:
    """TF's monitoring::Buckets::Exponential: bounds by repeated multiplication."""
    bounds, bound = [], scale
    for _ in range(count):
        bounds.append(bound)
        bound *= growth_factor
    return bounds


LATENCY_BUCKETS = _exponential_buckets(10.0, 1.8, 33)


def six_digits(value: float) -> str:
    """absl::StrCat(double): printf "%g" (six significant digits), as the exporter writes numbers."""
    return "%g" % value


class Metrics:
    """Thread-safe counters and histograms rendered as Prometheus text."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._latencies: dict[tuple[str, str, str], list] = {}

    def record(self, model_name: str, status: str, api: str, entrypoint: str, micros: float) -> None:
        """Count one request under its final gRPC code name; time it if it succeeded."""
        with self._lock:
            key = (model_name, status)
            self._counts[key] = self._counts.get(key, 0) + 1
            if status != "OK":
                return  # TF Serving records latency only for successful requests
            micros = int(micros)  # TF records whole microseconds
            histogram = self._latencies.setdefault(
                (model_name, api, entrypoint), [[0] * (len(LATENCY_BUCKETS) + 1), 0.0])
            histogram[0][bisect.bisect_right(LATENCY_BUCKETS, micros)] += 1
            histogram[1] += micros

    def render(self) -> str:
        with self._lock:
            lines = [f"# TYPE {REQUEST_COUNT} counter"]
            for (model, status), count in sorted(self._counts.items()):
                lines.append(f'{REQUEST_COUNT}{{model_name="{_escape(model)}",status="{status}"}} {count}')
            lines.append(f"# TYPE {REQUEST_LATENCY} histogram")
            for (model, api, entrypoint), (buckets, total) in sorted(self._latencies.items()):
                labels = f'model_name="{_escape(model)}",API="{_escape(api)}",entrypoint="{entrypoint}"'
                cumulative = 0
                for index, in_bucket in enumerate(buckets):
                    cumulative += in_bucket
                    le = six_digits(LATENCY_BUCKETS[index]) if index < len(LATENCY_BUCKETS) else "+Inf"
                    lines.append(f'{REQUEST_LATENCY}_bucket{{{labels},le="{le}"}} {cumulative}')
                lines.append(f"{REQUEST_LATENCY}_sum{{{labels}}} {six_digits(total)}")
                lines.append(f"{REQUEST_LATENCY}_count{{{labels}}} {cumulative}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """Label values as the exporter's SanitizeLabelValue (backslash and double quote escaped), and
    newlines too, which TF leaves raw: a REST model name is URL-decoded and may hold one, and a raw
    newline would break the page for every scraper."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------- --monitoring_config_file ----------------
def _monitoring_config_class():
    """tensorflow.serving.MonitoringConfig, built from its two-message .proto.

    The tensorflow-serving-api wheel does not ship monitoring_config_pb2, so the messages of
    tensorflow_serving/config/monitoring_config.proto are declared here, field for field.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="digitgan/monitoring_config.proto", package="tensorflow.serving", syntax="proto3")
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1,
                         type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                         type_name=".tensorflow.serving.PrometheusConfig",
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # own pool: never clashes with a real monitoring_config_pb2
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


def prometheus_path(monitoring_config_file: str | None) -> str | None:
    """The path to serve Prometheus metrics at, or None when they are off.

    None without a file or with `prometheus_config { enable: false }`, as tensorflow_model_server;
    an enabled config with no path uses the default path. ValueError names a bad file.
    """
    if monitoring_config_file is None:
        return None
    try:
        with open(monitoring_config_file, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read monitoring config file {monitoring_config_file!r}: {error}") from None
    config = _monitoring_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"monitoring config file {monitoring_config_file!r} is not a text-format "
                         f"MonitoringConfig: {error}") from None
    if not config.prometheus_config.enable:
        return None
    path = config.prometheus_config.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/"):
        raise ValueError(f"prometheus_config.path must start with '/', got {path!r}")
    return path
