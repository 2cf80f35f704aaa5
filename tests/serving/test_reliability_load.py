"""Reliability under load: 64 concurrent gRPC clients against real servers on loopback.

Three scenarios, each in a CI size (about LOAD_SECONDS of load) and a soak size
(DIGITGAN_SOAK_SECONDS, default 300, marked `soak`, run with `pytest -m soak`):

  * steady load on a fresh server: zero failed requests;
  * faults during load: a hot switch to a new version (built in a temp dir, then renamed), a
    broken higher version, and a config reload (version label, second model): zero failed
    requests, the broken version never answers, the switch happens and never goes back;
  * SIGTERM during load of `run_server` in a subprocess: requests sent before the signal all
    succeed, later ones succeed or are refused with UNAVAILABLE, and the process exits 0.

Latency percentiles are printed (visible with `pytest -s`) and recorded as properties, never
asserted: the 2-core CI machine is shared. Deadlines are generous for the same reason.
"""

from __future__ import annotations

import os
import resource
import signal
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

import serving_test_models as models
from serving_test_models import wait_for
from bench import loadtest
from bench.server_process import ServerProcess
from serving.config import FREE_PORT, ServeConfig
from serving.server import create_server

pytestmark = pytest.mark.slow  # 64 clients for seconds each, servers in subprocesses

CLIENTS = 64
LOAD_SECONDS = 8.0
SOAK_SECONDS = float(os.environ.get("DIGITGAN_SOAK_SECONDS", "300"))
REQUEST_DEADLINE = 60.0  # per request: a starved CPU must not turn into a failure
WAIT_SECONDS = 120.0  # for a version switch, a status, a process start
GRACE_SECONDS = 10.0
EXIT_ALLOWANCE = 30.0  # interpreter and TensorFlow teardown after stop(), on a busy machine
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
# Why a request may be refused after SIGTERM: our drain, or nobody listening any more.
REFUSALS = ("server is shutting down", "failed to connect", "Connection refused")


# ---------------- fixtures ----------------
@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second model's base path, added and removed by config reloads."""
    base = tmp_path_factory.mktemp("other") / "other"
    models.build_generator(str(base / "1"), scale=3.0)
    return base


@pytest.fixture
def load_server(tmp_path):
    """A fresh in-process server on port 0 serving a small real generator as version 1."""
    base = tmp_path / "digitgan"
    models.build_generator(str(base / "1"))
    server = create_server(ServeConfig(model_base_path=str(base), port=0, rest_port=0, poll_seconds=0.2,
                                       grace_seconds=2.0))
    server.start()
    assert server.wait_until_ready(WAIT_SECONDS)
    yield server, base
    server.stop(2.0)


# ---------------- helpers ----------------
def report(result: loadtest.LoadResult, title: str, record_property) -> None:
    """Print the figures (no assertion on them) and keep them in the JUnit properties."""
    print(f"\n[{title}] {result.report()}")
    for name in ("requests", "failed", "p50_ms", "p90_ms", "p99_ms", "max_ms", "requests_per_second"):
        record_property(f"{title}.{name}", round(getattr(result, name), 2))


def model_statuses(address: str, name: str = "digitgan") -> dict[int, tuple[int, int]]:
    """version -> (state, error code) from GetModelStatus."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    with grpc.insecure_channel(address) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, REQUEST_DEADLINE)
    return {status.version: (status.state, status.status.error_code) for status in response.model_version_status}


def export_version(base: Path, version: int, scale: float) -> None:
    """Build a version as our exporter does: in a non-numeric temp dir, then rename it."""
    staging = tempfile.mkdtemp(prefix=f".export-{version}-", dir=base)
    models.build_generator(staging, scale=scale)
    os.rename(staging, base / str(version))


def drop_broken_version(base: Path, version: int) -> None:
    """A complete-looking version directory whose saved_model.pb is garbage."""
    staging = Path(tempfile.mkdtemp(prefix=f".broken-{version}-", dir=base))
    (staging / "variables").mkdir()
    (staging / "saved_model.pb").write_bytes(b"this is not a SavedModel protobuf")
    os.rename(staging, base / str(version))


def reload_config(address: str, base: Path, stable: int, other_base: Path | None) -> None:
    """HandleReloadConfigRequest: digitgan with label stable -> `stable`, plus `other` if given."""
    config = model_server_config_pb2.ModelServerConfig()
    digitgan = config.model_config_list.config.add(name="digitgan", base_path=os.path.abspath(base),
                                                   model_platform="tensorflow")
    digitgan.version_labels["stable"] = stable
    if other_base is not None:
        config.model_config_list.config.add(name="other", base_path=os.path.abspath(other_base),
                                            model_platform="tensorflow")
    with grpc.insecure_channel(address) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), WAIT_SECONDS)
    assert response.status.error_code == 0, response.status.error_message


def predict_version(address: str, model: str = "digitgan", label: str = "") -> int:
    request = loadtest.predict_request(model)
    if label:
        request.model_spec.version_label = label
    with grpc.insecure_channel(address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, REQUEST_DEADLINE)
    return response.model_spec.version.value


def newest_answer_is(load: loadtest.LoadGenerator, version: int) -> bool:
    return any(outcome.version == version for outcome in load.outcomes[-4 * CLIENTS:])


def assert_never_went_back(outcomes: list[loadtest.Outcome]) -> None:
    """Once a version has answered, every request sent afterwards is answered by it or a newer one."""
    first_answer = {}
    for outcome in outcomes:
        if outcome.version is not None:
            first_answer[outcome.version] = min(first_answer.get(outcome.version, outcome.finished),
                                                outcome.finished)
    for outcome in outcomes:
        seen = [version for version, finished in first_answer.items() if finished < outcome.started]
        if outcome.version is not None and seen:
            assert outcome.version >= max(seen), (outcome, first_answer)


def peak_resident_mib() -> float:
    """Peak RSS of this process (the in-process server, clients and test), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------- scenarios ----------------
def steady_load(server, seconds: float, record_property, title: str) -> None:
    address = f"127.0.0.1:{server.grpc_port}"
    result = loadtest.LoadGenerator(address, clients=CLIENTS, seconds=seconds, timeout=REQUEST_DEADLINE).run()
    report(result, title, record_property)
    assert result.failures == {}, result.report()
    assert result.requests > CLIENTS
    assert set(result.versions) == {1}


def fault_round(address: str, base: Path, good: int, other_base: Path | None,
                load: loadtest.LoadGenerator) -> None:
    """New version `good` and broken `good + 1` appear together; then a config reload."""
    export_version(base, good, scale=1.0 + good / 10)
    drop_broken_version(base, good + 1)
    assert wait_for(lambda: newest_answer_is(load, good)), f"version {good} never answered"
    assert wait_for(lambda: model_statuses(address).get(good + 1, (0, 0))[0] == END)
    _state, code = model_statuses(address)[good + 1]
    assert code != grpc.StatusCode.OK.value[0], "a broken version must report an error"
    reload_config(address, base, stable=good, other_base=other_base)
    assert predict_version(address, label="stable") == good
    if other_base is not None:
        assert predict_version(address, model="other") == 1


def faults_under_load(server, base: Path, other_base: Path, seconds: float, record_property, title: str) -> None:
    address = f"127.0.0.1:{server.grpc_port}"
    load = loadtest.LoadGenerator(address, clients=CLIENTS, seconds=seconds + 10 * WAIT_SECONDS,
                                  timeout=REQUEST_DEADLINE)
    load.start()
    good_versions, broken_versions = [1], []
    started = time.monotonic()
    try:
        assert wait_for(lambda: load.successes() >= CLIENTS)
        while not broken_versions or time.monotonic() - started < seconds:
            good = good_versions[-1] + 2 if broken_versions else 2
            with_other = len(broken_versions) % 2 == 0  # add the second model, then remove it, ...
            fault_round(address, base, good, other_base if with_other else None, load)
            good_versions.append(good)
            broken_versions.append(good + 1)
            print(f"\n[{title}] round {len(broken_versions)}: v{good} serving, v{good + 1} broken, "
                  f"reloaded ({'with' if with_other else 'without'} 'other'); "
                  f"this process's peak RSS {peak_resident_mib():.0f} MiB")
        count = load.successes()
        assert wait_for(lambda: load.successes() >= count + CLIENTS)  # traffic after the last reload
    finally:
        load.stop()
        result = load.join(REQUEST_DEADLINE + 30)
    report(result, title, record_property)
    print(f"[{title}] faults: versions {good_versions[1:]} hot-switched, {broken_versions} broken, "
          f"{len(broken_versions)} config reloads")
    assert result.failures == {}, result.report()
    assert not set(result.versions) & set(broken_versions), result.versions
    assert set(result.versions) <= set(good_versions), result.versions
    assert max(result.versions) == good_versions[-1]
    assert_never_went_back(result.outcomes)
    statuses = model_statuses(address)
    assert statuses[good_versions[-1]] == (AVAILABLE, 0)
    for version in broken_versions:
        assert statuses[version][0] == END and statuses[version][1] != 0, statuses
    for version in good_versions[:-1]:
        assert statuses[version] == (END, 0), statuses


def start_server_process(base_path: str) -> ServerProcess:
    """run_server in a subprocess, once its model is loaded."""
    server = ServerProcess.start(model_base_path=base_path, port=0, rest_port=FREE_PORT,
                                 grace_seconds=GRACE_SECONDS, timeout=WAIT_SECONDS)
    assert "model digitgan: versions [1]" in server.lines, server.lines
    return server


def refused_after(load: loadtest.LoadGenerator, moment: float) -> bool:
    """Whether a request sent after `moment` has already come back refused."""
    return any(outcome.started >= moment and outcome.code != loadtest.OK for outcome in list(load.outcomes))


def sigterm_under_load(base_path: str, seconds: float, record_property, title: str) -> None:
    server = start_server_process(base_path)
    load = loadtest.LoadGenerator(server.address, clients=CLIENTS, seconds=seconds + 10 * WAIT_SECONDS,
                                  timeout=REQUEST_DEADLINE)
    try:
        load.start()
        assert wait_for(lambda: load.successes() >= CLIENTS)
        time.sleep(seconds)  # the load runs this long before the signal: what is measured, not a wait
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=GRACE_SECONDS + EXIT_ALLOWANCE)
        exited = time.monotonic()
        # Clients keep trying: they must be refused, not left hanging (a hung one fails the checks below).
        assert wait_for(lambda: refused_after(load, exited), timeout=REQUEST_DEADLINE)
    finally:
        load.stop()
        server.kill()
    result = load.join(REQUEST_DEADLINE + 30)
    before = [outcome for outcome in result.outcomes if outcome.started < signalled]
    in_flight = [outcome for outcome in before if outcome.finished > signalled]
    after = [outcome for outcome in result.outcomes if outcome.started >= signalled]
    refused = [outcome for outcome in after if outcome.code != loadtest.OK]
    report(result, title, record_property)
    print(f"[{title}] SIGTERM after {len(before)} requests; {len(in_flight)} in flight then, "
          f"{sum(o.code == loadtest.OK for o in in_flight)} of them OK; after it {len(after) - len(refused)} OK, "
          f"{len(refused)} refused; exit code {exit_code} {exited - signalled:.2f} s after SIGTERM "
          f"(grace {GRACE_SECONDS:.0f} s)")
    record_property(f"{title}.exit_seconds", round(exited - signalled, 2))
    assert exit_code == 0
    assert in_flight, "SIGTERM must come while requests are in flight"
    assert all(outcome.code == loadtest.OK for outcome in before), result.report()
    assert refused, "requests after shutdown must have been tried"
    assert set(result.failures) == {"UNAVAILABLE"}, result.report()
    assert all(any(text in outcome.details for text in REFUSALS) for outcome in refused), \
        {outcome.details for outcome in refused}


# ---------------- CI size ----------------
def test_load_summary_counts_failures_and_percentiles():
    outcomes = [loadtest.Outcome(0.0, latency / 1000, loadtest.OK, 1) for latency in range(1, 101)]
    outcomes += [loadtest.Outcome(0.0, 5.0, "UNAVAILABLE", details="server is shutting down")] * 3
    result = loadtest.summarize(outcomes, clients=4, seconds=2.0)
    assert (result.requests, result.failed, result.failures) == (103, 3, {"UNAVAILABLE": 3})
    assert result.versions == {1: 100}
    assert (result.p50_ms, result.p90_ms, result.p99_ms, result.max_ms) == pytest.approx((50, 90, 99, 100))
    assert result.requests_per_second == pytest.approx(51.5)
    assert "UNAVAILABLE 3" in result.report()


def test_steady_load_no_failures(load_server, record_property):
    server, _ = load_server
    steady_load(server, LOAD_SECONDS, record_property, "steady")


def test_hot_switch_broken_version_and_reload_under_load(load_server, other_model, record_property):
    server, base = load_server
    faults_under_load(server, base, other_model, LOAD_SECONDS, record_property, "faults")


def test_sigterm_under_load(model_root, record_property):
    sigterm_under_load(str(model_root / "digitgan"), LOAD_SECONDS / 2, record_property, "sigterm")


# ---------------- soak size (pytest -m soak) ----------------
@pytest.mark.soak
def test_soak_steady_load(load_server, record_property):
    server, _ = load_server
    steady_load(server, SOAK_SECONDS, record_property, "soak-steady")


@pytest.mark.soak
def test_soak_faults_under_load(load_server, other_model, record_property):
    server, base = load_server
    faults_under_load(server, base, other_model, SOAK_SECONDS, record_property, "soak-faults")


@pytest.mark.soak
def test_soak_sigterm_under_load(model_root, record_property):
    sigterm_under_load(str(model_root / "digitgan"), SOAK_SECONDS, record_property, "soak-sigterm")
