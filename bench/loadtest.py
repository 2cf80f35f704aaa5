"""A closed-loop gRPC load generator for the model server (no Go, no Docker).

N concurrent clients (asyncio coroutines on one `grpc.aio` channel) each send Predict requests
back to back for a bounded time. Every request is recorded with its start time, latency, status
code and the version that answered, so callers can check what happened around an event (a hot
switch, a SIGTERM) as well as read the summary.

    python -m bench.loadtest --server localhost:8500 --clients 64 --seconds 30

As a library: `LoadGenerator(...).run()` blocks and returns a `LoadResult`; `start()` runs it in a
background thread (read `outcomes` while it runs), and `stop()` + `join()` end it early.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import threading
import time

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from client.grpc_client import CHANNEL_OPTIONS
from serving import tensors
from serving.config import MODEL_NAME, SERVER

OK = "OK"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request: when it started and ended (time.monotonic()), its status, who answered."""

    started: float
    finished: float
    code: str  # "OK", a grpc.StatusCode name, or "CLIENT_<ExceptionType>"
    version: int | None = None  # the version that answered (OK only)
    details: str = ""  # first line of the error details (failures only)

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1e3


@dataclasses.dataclass
class LoadResult:
    """Summary of one load run; latency percentiles are over successful requests only."""

    clients: int
    seconds: float
    requests: int
    failures: dict[str, int]
    versions: dict[int, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests_per_second: float
    outcomes: list[Outcome] = dataclasses.field(repr=False, default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def report(self) -> str:
        """A few human-readable lines."""
        failures = ", ".join(f"{code} {count}" for code, count in sorted(self.failures.items())) or "none"
        versions = ", ".join(f"v{version}: {count}" for version, count in sorted(self.versions.items()))
        latency = (f"p50 {self.p50_ms:.1f}  p90 {self.p90_ms:.1f}  p99 {self.p99_ms:.1f}  max {self.max_ms:.1f}"
                   if self.versions else "none succeeded")
        return (f"{self.clients} clients, {self.seconds:.1f} s: {self.requests} requests, "
                f"{self.requests_per_second:.1f} req/s, failures: {failures}\n"
                f"latency ms (OK requests): {latency}\n"
                f"answered by: {versions or 'nobody'}")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(np.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def summarize(outcomes: list[Outcome], clients: int, seconds: float) -> LoadResult:
    """Counts, failure codes, versions and latency percentiles of a list of outcomes."""
    latencies = sorted(outcome.latency_ms for outcome in outcomes if outcome.code == OK)
    failures = collections.Counter(outcome.code for outcome in outcomes if outcome.code != OK)
    versions = collections.Counter(outcome.version for outcome in outcomes if outcome.version is not None)
    return LoadResult(
        clients=clients, seconds=seconds, requests=len(outcomes), failures=dict(failures),
        versions=dict(versions), p50_ms=percentile(latencies, 0.50), p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99), max_ms=latencies[-1] if latencies else 0.0,
        requests_per_second=len(outcomes) / seconds if seconds > 0 else 0.0, outcomes=list(outcomes))


def predict_request(model_name: str, rows: int = 1, latent_dim: int = 100,
                    signature_name: str = "") -> predict_pb2.PredictRequest:
    """A Predict request with a [rows, latent_dim] float32 `noise` input.

    The tensor is written as tensor_content (`serving.tensors`): tf.make_tensor_proto would cost more
    client CPU than the server spends on the tiny test model.
    """
    noise = np.random.default_rng(0).standard_normal((rows, latent_dim)).astype(np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    if signature_name:
        request.model_spec.signature_name = signature_name
    request.inputs["noise"].CopyFrom(tensors.ndarray_to_proto(noise, use_tensor_content=True))
    return request


class LoadGenerator:
    """`clients` coroutines sending `request` back to back for `seconds` (or until stop()).

    After UNAVAILABLE a client waits `unavailable_backoff` seconds before its next request, as a
    gRPC client backs off before reconnecting, rather than spinning on a server that is gone.
    """

    def __init__(self, target: str, model_name: str = MODEL_NAME, clients: int = 64, seconds: float = 30.0,
                 timeout: float = 60.0, request: predict_pb2.PredictRequest | None = None,
                 unavailable_backoff: float = 1.0):
        if clients < 1 or seconds <= 0 or timeout <= 0 or unavailable_backoff < 0:
            raise ValueError("clients, seconds and timeout must be positive, unavailable_backoff >= 0")
        self.target = target
        self.clients = clients
        self.seconds = seconds
        self.timeout = timeout  # per-request deadline; generous, so a starved CPU is not a failure
        self.unavailable_backoff = unavailable_backoff
        self.request = request if request is not None else predict_request(model_name)
        self.outcomes: list[Outcome] = []  # appended live (list.append is atomic under the GIL)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: LoadResult | None = None
        self._error: BaseException | None = None

    # ---- running ----
    def run(self) -> LoadResult:
        """Run to completion in this thread and return the summary."""
        started = time.monotonic()
        asyncio.run(self._run_clients())
        self._result = summarize(self.outcomes, self.clients, time.monotonic() - started)
        return self._result

    def start(self) -> None:
        """Run in a background thread; see stop() and join()."""
        self._thread = threading.Thread(target=self._run_in_thread, name="loadtest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send no new requests; those in flight still finish (or hit their deadline)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> LoadResult:
        """Wait for the background run and return its summary."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"load generator still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def successes(self) -> int:
        return sum(1 for outcome in list(self.outcomes) if outcome.code == OK)

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as error:  # re-raised by join() in the caller's thread
            self._error = error

    # ---- the clients ----
    async def _run_clients(self) -> None:
        deadline = time.monotonic() + self.seconds
        async with grpc.aio.insecure_channel(self.target, options=list(CHANNEL_OPTIONS)) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            await asyncio.gather(*(self._client(stub, deadline) for _ in range(self.clients)))

    async def _client(self, stub, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            outcome = await self._one_request(stub)
            self.outcomes.append(outcome)
            if outcome.code == grpc.StatusCode.UNAVAILABLE.name:
                await asyncio.sleep(self.unavailable_backoff)

    async def _one_request(self, stub) -> Outcome:
        started = time.monotonic()
        try:
            response = await stub.Predict(self.request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            details = (error.details() or "").splitlines()
            return Outcome(started, time.monotonic(), error.code().name, details=details[0] if details else "")
        except Exception as error:  # recorded, not hidden: a client bug must show as a failure
            return Outcome(started, time.monotonic(), f"CLIENT_{type(error).__name__}", details=str(error))
        return Outcome(started, time.monotonic(), OK, response.model_spec.version.value)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the load and print the report; exit 1 if any request failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=SERVER, help="host:port of the gRPC server")
    parser.add_argument("--model-name", "--model", dest="model_name", default=MODEL_NAME,
                        help="model name in ModelSpec, as `cli.py --model-name` (--model: the old spelling, kept for one release)")
    parser.add_argument("--signature", default="", help="signature name (default: serving_default)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to send requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds")
    parser.add_argument("--rows", type=int, default=1, help="images per request")
    parser.add_argument("--latent-dim", type=int, default=100, help="width of the noise input")
    parser.add_argument("--unavailable-backoff", type=float, default=1.0,
                        help="seconds a client waits after UNAVAILABLE before its next request")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.latent_dim < 1:
        parser.error(f"--rows and --latent-dim must be at least 1, got {args.rows} and {args.latent_dim}")
    request = predict_request(args.model_name, args.rows, args.latent_dim, args.signature)
    try:
        generator = LoadGenerator(args.server, args.model_name, args.clients, args.seconds, args.timeout, request,
                                  args.unavailable_backoff)
    except ValueError as error:
        parser.error(str(error))  # one line and exit code 2, not a traceback
    result = generator.run()
    print(f"target {args.server}, model {args.model_name!r}, {args.rows} image(s) per request")
    print(result.report())
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
