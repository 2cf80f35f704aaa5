"""Prometheus metrics with TF Serving's names, shared by the gRPC and REST paths.

`:tensorflow:serving:request_count{model_name,status}` counts every inference request;
`:tensorflow:serving:request_latency{model_name,API,entrypoint}` is a microsecond histogram
of successful ones, with TF Serving's 33 buckets 10 * 1.8**k.
"""

from __future__ import annotations

import threading

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
LATENCY_BUCKETS = [10 * 1.8**k for k in range(33)]


class Metrics:
    """Thread-safe counters and histograms rendered as Prometheus text."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._latencies: dict[tuple[str, str, str], list] = {}

    def record(self, model_name: str, status: str, api: str, entrypoint: str, micros: float) -> None:
        with self._lock:
            key = (model_name, status)
            self._counts[key] = self._counts.get(key, 0) + 1
            if status != "OK":
                return  # TF Serving records latency only for successful requests
            histogram = self._latencies.setdefault(
                (model_name, api, entrypoint), [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0])
            histogram[0][_bucket_index(micros)] += 1
            histogram[1] += micros
            histogram[2] += 1

    def render(self) -> str:
        with self._lock:
            lines = [f"# TYPE {REQUEST_COUNT} counter"]
            for (model, status), count in sorted(self._counts.items()):
                lines.append(f'{REQUEST_COUNT}{{model_name="{_escape(model)}",status="{status}"}} {count}')
            lines.append(f"# TYPE {REQUEST_LATENCY} histogram")
            for (model, api, entrypoint), (buckets, total, count) in sorted(self._latencies.items()):
                labels = f'model_name="{_escape(model)}",API="{api}",entrypoint="{entrypoint}"'
                cumulative = 0
                for bound, in_bucket in zip(LATENCY_BUCKETS + [float("inf")], buckets):
                    cumulative += in_bucket
                    le = "+Inf" if bound == float("inf") else repr(float(bound))
                    lines.append(f'{REQUEST_LATENCY}_bucket{{{labels},le="{le}"}} {cumulative}')
                lines.append(f"{REQUEST_LATENCY}_sum{{{labels}}} {total}")
                lines.append(f"{REQUEST_LATENCY}_count{{{labels}}} {count}")
        return "\n".join(lines) + "\n"


def _bucket_index(micros: float) -> int:
    for index, bound in enumerate(LATENCY_BUCKETS):
        if micros <= bound:
            return index
    return len(LATENCY_BUCKETS)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
