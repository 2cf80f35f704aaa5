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

    .venv/bin/python bench/serving_memory.py                  # about 1-2 minutes
    .venv/bin/python bench/serving_memory.py --switches 5     # more switches (leak check)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc  # noqa: E402

from serving import loadtest  # noqa: E402
from serving_latency import MODEL_NAME, find_or_build_bundle  # noqa: E402

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
SERVER_CODE = ("import sys; from serving.config import ServeConfig; from serving.server import run_server; "
               "sys.exit(run_server(ServeConfig(model_base_path=sys.argv[1], port=0, rest_port=-1)))")


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
def start_server(base_path: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(base_path)], cwd=str(ROOT),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        match = re.match(r"gRPC listening on .*:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, f"127.0.0.1:{match.group(1)}"
    raise SystemExit("the server subprocess did not start")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base-path", default=None,
                        help="folder of numeric versions to copy from (default: models/digitgan, else built)")
    parser.add_argument("--switches", type=int, default=6, help="hot switches to measure (default 6)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients during the run (default 8)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="serving_memory_"))
    source_base, description, latent = find_or_build_bundle(args.model_base_path, str(workdir / "source"))
    source = Path(source_base) / str(max(int(p.name) for p in Path(source_base).iterdir() if p.name.isdigit()))
    base_path = workdir / "served" / MODEL_NAME
    base_path.mkdir(parents=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"bundle: {description}; {sum(f.stat().st_size for f in source.rglob('*') if f.is_file()) / 2**20:.1f} "
          f"MiB on disk")
    print("server: subprocess, run_server(ServeConfig(port=0, rest_port=-1)), poll every 1 s; "
          f"{args.clients} clients send 1-image Predict requests throughout\n")

    process, address = start_server(base_path)
    load = None
    try:
        runtime = settle(process.pid)
        publish(source, base_path, 1)
        wait_until(lambda: statuses(address).get(1) == AVAILABLE)
        request = loadtest.predict_request(MODEL_NAME, latent_dim=latent)
        load = loadtest.LoadGenerator(address, MODEL_NAME, clients=args.clients, seconds=3600, request=request)
        load.start()
        one_version = settle(process.pid, 5.0)
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
    finally:
        if load is not None:
            load.stop()
        process.terminate()
        process.wait(60)
    result = load.join(120)
    worst = max(peaks)
    model_one = one_version - runtime
    print(f"\nload during the run: {result.requests} requests, failures {result.failures or 'none'}, "
          f"answered by {result.versions}")
    print(f"peak during a switch / one version:         {worst / one_version:.2f}x  "
          f"({worst:.1f} / {one_version:.1f} MiB)  target < 2x: {'met' if worst < 2 * one_version else 'NOT met'}")
    if model_one > 0:
        print(f"above the runtime, peak / one version:      {(worst - runtime) / model_one:.2f}x  "
              f"({worst - runtime:.1f} / {model_one:.1f} MiB; includes the drift below)")
        print(f"a switch's own cost / one version's cost:   {max(extras) / model_one:.2f}x at most  "
              f"(+{max(extras):.1f} MiB over the RSS before the switch vs {model_one:.1f} MiB for v1)")
    print(f"after the last switch / one version:        {afters[-1] / one_version:.2f}x  "
          f"(growth over {len(afters)} switches: {afters[-1] - one_version:+.1f} MiB)")
    print(json.dumps({"bench": "serving_memory", "runtime_mib": round(runtime, 1), "one_version_mib": round(one_version, 1),
                      "switch_peaks_mib": [round(peak, 1) for peak in peaks],
                      "after_switch_mib": [round(after, 1) for after in afters],
                      "peak_over_one_version": round(worst / one_version, 3), "target_below_2x": worst < 2 * one_version,
                      "requests": result.requests, "failures": result.failures}, default=str))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
