"""Resident memory of the model server: one version loaded vs the peak while a hot switch loads a second.

The project's server runs in a subprocess (`run_server`, as `python cli.py serve` runs it), first
with an empty model base path, then versions are published into it the way the exporter does
(copied into a non-numeric temp dir, then renamed to the next number) while clients keep
sending Predict requests. Figures come from /proc/<pid>/status:

  * VmRSS with no model yet (TensorFlow, gRPC and the server loaded): the runtime;
  * VmRSS serving one version under load;
  * the peak (VmHWM, reset through /proc/<pid>/clear_refs before each switch, plus 20 ms
    samples of VmRSS) while the next version loads next to the old one, until the old one
    reaches END;
  * VmRSS after the switch, to see whether the replaced version's memory is given back.

The target is peak / one-version < 2x. Nothing is asserted.

First (unless --no-compare-storage), one version in a fresh server for each of two bundles of the
same untrained default-recipe generator: as `export` writes it now (each weight stored once) and
as it wrote it before (Keras `ExportArchive.track(model)`, which stores every weight twice,
keras-team/keras#23553), with the values each stores and the VmRSS each costs.

    .venv/bin/python -m bench.serving_memory                  # a few minutes
    .venv/bin/python -m bench.serving_memory --switches 5     # more switches (leak check)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_kernels, quiet

if __name__ == "__main__":
    quiet.install()  # before TensorFlow is imported; DIGITGAN_VERBOSE=1 shows its logs
    cpu_kernels.use_onednn()  # likewise before TensorFlow: the kernels `cli.py` runs with

import grpc  # noqa: E402
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc  # noqa: E402

from bench import loadtest  # noqa: E402
from bench.server_process import ServerProcess  # noqa: E402
from bench.serving_latency import MODEL_NAME, find_or_build_bundle  # noqa: E402
from serving.config import MODEL_BASE_PATH  # noqa: E402

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


# ---------------- /proc ----------------
def status_mib(pid: int, field: str) -> float:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM) in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Samples VmRSS every 20 ms in a thread, keeping the maximum (backs up VmHWM)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, status_mib(self.pid, "VmRSS"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


# ---------------- the server ----------------
def start_server(base_path: Path) -> ServerProcess:
    """run_server on a base path with no version yet, in a subprocess, once it waits for one (its
    ports open once a version is loaded)."""
    return ServerProcess.start(wait_for_models=False, model_base_path=str(base_path), port=0, rest_port=0)


def statuses(address: str) -> dict[int, int]:
    """version -> state, or {} while the model has no version yet."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    with grpc.insecure_channel(address) as channel:
        try:
            response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, 30)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return {}
            raise
    return {status.version: status.state for status in response.model_version_status}


def wait_until(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the server")
        time.sleep(0.05)


def publish(source: Path, base_path: Path, version: int) -> None:
    """As the exporter: a complete copy in a non-numeric temp dir, then one rename."""
    staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=base_path))
    shutil.copytree(source, staging, dirs_exist_ok=True)
    os.rename(staging, base_path / str(version))


# ---------------- each weight once vs twice ----------------
def write_storage_bundles(workdir: Path) -> tuple[list[tuple[str, Path]], int, int]:
    """([(label, version folder)] for the export now and the old double-storing one), parameters, latent size.

    Both hold the same untrained generator of the default recipe, with the same signatures and
    warmup records; only the variables that are tracked differ.
    """
    import keras

    from configs import recipes
    from export import bundle as bundle_lib, signatures as signatures_lib
    from trainer import models

    defaults = recipes.build("default")
    generator = models.build_generator_of(defaults)
    module = signatures_lib.GeneratorSignatures(generator, defaults.latent_dim, conditional=True)
    once, twice = workdir / "once" / "1", workdir / "twice" / "1"
    module.write(str(once))
    archive = keras.export.ExportArchive()  # the export before the fix: the Keras wrappers tracked as well
    archive.track(generator)
    for name, function, input_signature in module.endpoints():
        archive.add_endpoint(name, function, input_signature=input_signature)
    archive.write_out(str(twice), verbose=False)
    for folder in (once, twice):
        bundle_lib.write_warmup(folder, MODEL_NAME, module)
    labels = ("each weight once (export now)", "every weight twice (track(model), before)")
    return list(zip(labels, (once, twice))), generator.count_params(), defaults.latent_dim


def stored_values(version_folder: Path) -> int:
    """Values in the bundle's checkpoint, the object graph left out."""
    import numpy as np
    import tensorflow as tf

    listed = tf.train.list_variables(str(version_folder / "variables" / "variables"))
    return sum(int(np.prod(shape)) for name, shape in listed if name != "_CHECKPOINTABLE_OBJECT_GRAPH")


@contextlib.contextmanager
def one_version_under_load(source: Path, base_path: Path, clients: int, latent: int):
    """A fresh server subprocess serving `source` as v1 while `clients` send Predict requests.

    Yields (server, VmRSS MiB with no model, VmRSS MiB with v1 under load, the load generator); the
    load and the server are stopped on the way out (join the load afterwards for its result).
    """
    server = start_server(base_path)
    load = None
    try:
        runtime = settle(server.process.pid)
        publish(source, base_path, 1)
        server.wait_for_listening()
        wait_until(lambda: statuses(server.address).get(1) == AVAILABLE)
        load = loadtest.LoadGenerator(server.address, MODEL_NAME, clients=clients, seconds=3600,
                                      request=loadtest.predict_request(MODEL_NAME, latent_dim=latent))
        load.start()
        yield server, runtime, settle(server.process.pid, 5.0), load
    finally:
        if load is not None:
            load.stop()
        server.stop(60)


def one_version_rss(source: Path, workdir: Path, clients: int, latent: int) -> tuple[float, float]:
    """(VmRSS with no model, VmRSS serving `source` as v1 under load), in a fresh server subprocess."""
    base_path = workdir / MODEL_NAME
    base_path.mkdir(parents=True)
    with one_version_under_load(source, base_path, clients, latent) as (_, runtime, one_version, load):
        pass
    load.join(120)
    return runtime, one_version


def compare_storage(workdir: Path, clients: int) -> None:
    bundles, parameters, latent = write_storage_bundles(workdir / "storage")
    print(f"one version in a fresh server, the same untrained default generator ({parameters:,} parameters) "
          f"written two ways:")
    print(f"{'bundle':<44} {'stored values':>14} {'on disk':>10} {'no model':>10} {'one version':>12} "
          f"{'model':>9}")
    for index, (label, folder) in enumerate(bundles):
        runtime, one_version = one_version_rss(folder, workdir / f"storage-served-{index}", clients, latent)
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        print(f"{label:<44} {stored_values(folder):>14,} {disk:>6.1f} MiB {runtime:>6.1f} MiB "
              f"{one_version:>8.1f} MiB {one_version - runtime:>5.1f} MiB")
    print("(model = one version - no model, VmRSS of the same server process)\n")


# ---------------- measuring ----------------
def settle(pid: int, seconds: float = 2.0) -> float:
    """VmRSS after a pause, so the figure is not caught in the middle of a burst."""
    time.sleep(seconds)
    return status_mib(pid, "VmRSS")


def measure_switch(pid: int, address: str, source: Path, base_path: Path, version: int) -> tuple[float, bool]:
    """Peak RSS while `version` loads next to `version - 1`, until the old one reaches END."""
    hwm_reset = reset_peak(pid)
    sampler = PeakSampler(pid)
    publish(source, base_path, version)
    wait_until(lambda: statuses(address).get(version - 1) == END)
    sampled = sampler.stop()
    peak = max(sampled, status_mib(pid, "VmHWM")) if hwm_reset else sampled
    return peak, hwm_reset


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base-path", default=None,
                        help=f"folder of numeric versions to copy from (default: {MODEL_BASE_PATH}, else built)")
    parser.add_argument("--switches", type=int, default=6, help="hot switches to measure (default 6)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients during the run (default 8)")
    parser.add_argument("--compare-storage", action=argparse.BooleanOptionalAction, default=True,
                        help="first measure one version stored once vs twice (default on)")
    return parser.parse_args()


def prepare_source(model_base_path: str | None, workdir: Path, clients: int) -> tuple[Path, int]:
    """(the version folder to publish, its latent size); prints the machine, the bundle and the load."""
    source_base, description, latent = find_or_build_bundle(model_base_path, str(workdir / "source"))
    source = Path(source_base) / str(max(int(p.name) for p in Path(source_base).iterdir() if p.name.isdigit()))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"bundle: {description}; {sum(f.stat().st_size for f in source.rglob('*') if f.is_file()) / 2**20:.1f} "
          f"MiB on disk")
    print("server: subprocess, run_server(ServeConfig(port=0, rest_port=0)), poll every 1 s; "
          f"{clients} clients send 1-image Predict requests throughout\n")
    return source, latent


def measure_switches(source: Path, base_path: Path, args, latent: int) -> dict:
    """One server under load: v1, then `args.switches` hot switches, each row printed as measured.

    Returns the runtime and one-version VmRSS, each switch's peak, RSS after and extra over the RSS
    before, and the load's result.
    """
    with one_version_under_load(source, base_path, args.clients, latent) as (server, runtime, one_version, load):
        process, address = server.process, server.address
        print(f"{'runtime, no model loaded':<44} VmRSS {runtime:8.1f} MiB")
        print(f"{'serving one version (v1)':<44} VmRSS {one_version:8.1f} MiB")
        peaks, afters, extras = [], [], []
        for version in range(2, args.switches + 2):
            before = status_mib(process.pid, "VmRSS")
            peak, hwm = measure_switch(process.pid, address, source, base_path, version)
            after = settle(process.pid)
            peaks.append(peak)
            afters.append(after)
            extras.append(peak - before)
            source_of_peak = "VmHWM and samples" if hwm else "20 ms samples only"
            print(f"switch v{version - 1} -> v{version}: before {before:7.1f}  peak {peak:7.1f} "
                  f"(+{peak - before:5.1f})  after {after:7.1f} MiB   [peak from {source_of_peak}]")
    return {"runtime": runtime, "one_version": one_version, "peaks": peaks, "afters": afters, "extras": extras,
            "load": load.join(120)}


def print_summary(run: dict) -> None:
    """The load, the peak against one version (the target), and what the switches left behind."""
    runtime, one_version, afters, result = run["runtime"], run["one_version"], run["afters"], run["load"]
    worst, model_one = max(run["peaks"]), one_version - runtime
    print(f"\nload during the run: {result.requests} requests, failures {result.failures or 'none'}, "
          f"answered by {result.versions}")
    print(f"peak during a switch / one version:         {worst / one_version:.2f}x  "
          f"({worst:.1f} / {one_version:.1f} MiB)  target < 2x: {'met' if worst < 2 * one_version else 'NOT met'}")
    if model_one > 0:
        print(f"above the runtime, peak / one version:      {(worst - runtime) / model_one:.2f}x  "
              f"({worst - runtime:.1f} / {model_one:.1f} MiB; includes the drift below)")
        print(f"a switch's own cost / one version's cost:   {max(run['extras']) / model_one:.2f}x at most  "
              f"(+{max(run['extras']):.1f} MiB over the RSS before the switch vs {model_one:.1f} MiB for v1)")
    print(f"after the last switch / one version:        {afters[-1] / one_version:.2f}x  "
          f"(growth over {len(afters)} switches: {afters[-1] - one_version:+.1f} MiB)")


def print_json(run: dict) -> None:
    """The same figures as one JSON line, for scripts."""
    worst, one_version, result = max(run["peaks"]), run["one_version"], run["load"]
    print(json.dumps({"bench": "serving_memory", "runtime_mib": round(run["runtime"], 1),
                      "one_version_mib": round(one_version, 1),
                      "switch_peaks_mib": [round(peak, 1) for peak in run["peaks"]],
                      "after_switch_mib": [round(after, 1) for after in run["afters"]],
                      "peak_over_one_version": round(worst / one_version, 3),
                      "target_below_2x": worst < 2 * one_version,
                      "requests": result.requests, "failures": result.failures}, default=str))


def main() -> None:
    args = parse_arguments()
    workdir = Path(tempfile.mkdtemp(prefix="serving_memory_"))
    source, latent = prepare_source(args.model_base_path, workdir, args.clients)
    if args.compare_storage:
        compare_storage(workdir, args.clients)
    base_path = workdir / "served" / MODEL_NAME
    base_path.mkdir(parents=True)
    run = measure_switches(source, base_path, args, latent)
    print_summary(run)
    print_json(run)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
