"""Choosing the `tf.distribute` strategy from `--gpus`, `--cpu-replicas` and `TF_CONFIG`.

Several devices get a mirrored strategy (MirroredStrategy over N GPUs or N logical CPUs,
MultiWorkerMirroredStrategy over several machines); a single device gets TensorFlow's default
strategy (or OneDeviceStrategy on the CPU when GPUs were already initialised), which skips the
mirroring machinery's cost. The same step and loop run under every one of them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import tensorflow as tf


class StrategyError(ValueError):
    """The requested devices are not available; the message says what to pass instead."""


def create_strategy(gpus: int | None = None, cpu_replicas: int | None = None) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when TF_CONFIG is set, else MirroredStrategy over the chosen devices
    (TensorFlow's default strategy when that is a single device and --cpu-replicas was not given).

    gpus: None = every visible GPU (CPU when there is none); 0 = CPU; N = GPUs 0..N-1, and fewer
    visible GPUs is an error, never a silent fallback. cpu_replicas: N logical CPU devices.
    Must run before TensorFlow initialises its devices (the CLI calls it first).
    """
    if os.environ.get("TF_CONFIG"):
        return _multi_worker(cpu_replicas)
    visible_gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus is None:
        gpus = visible_gpus if cpu_replicas is None else 0
    if gpus > visible_gpus:
        raise StrategyError(
            f"--gpus {gpus} asks for {gpus} GPU(s) but {visible_gpus} {'is' if visible_gpus == 1 else 'are'} visible; "
            f"pass --gpus {visible_gpus} (or --gpus 0 --cpu-replicas {max(gpus, 2)} to test the distributed path on the CPU)")
    if gpus == 0 and visible_gpus and not _hide_gpus():
        # GPUs already initialised in this process: pin the one CPU replica explicitly instead.
        if cpu_replicas is None:
            return tf.distribute.OneDeviceStrategy("/cpu:0")
        return _cpu_mirrored(configure_cpu_devices(cpu_replicas))
    devices = [f"/gpu:{index}" for index in range(gpus)] if gpus else configure_cpu_devices(cpu_replicas or 1)
    if len(devices) == 1 and cpu_replicas is None:
        # One device: TensorFlow's default strategy runs the same code (scope, run, reduce) without
        # the mirroring machinery, which costs a large share of a CPU step (docs/experiments.md).
        return tf.distribute.get_strategy()
    if gpus:
        return tf.distribute.MirroredStrategy(devices)  # NCCL all-reduce between GPUs
    return _cpu_mirrored(devices)


def _cpu_mirrored(devices: list[str]) -> tf.distribute.Strategy:
    # On logical CPU devices, reduce through one device rather than collective ops: collective
    # instance keys restart with every strategy, so a second strategy in the same process (a test
    # suite, a notebook) with other tensor shapes fails with "Shape mismatch in the collective instance".
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def _hide_gpus() -> bool:
    """Makes the GPUs invisible to this process, so --gpus 0 really trains on the CPU (TensorFlow's
    default strategy would otherwise place everything on GPU:0). False when it is too late for that."""
    try:
        tf.config.set_visible_devices([], "GPU")
        return True
    except RuntimeError:
        return False


def resolve_precision(precision: str, strategy: tf.distribute.Strategy, cpu_info: str | None = None) -> str:
    """The precision a run uses: `precision` itself, or for "auto" the faster one that costs no quality.

    "auto" is mixed_bfloat16 on a CPU-only run whose CPU runs bfloat16 convolutions faster than
    float32 (`bfloat16_is_faster`), float32 elsewhere (GPUs included: mixed_float16 is not chosen).
    `cpu_info` is the text of /proc/cpuinfo (read when None; empty where there is none, as on macOS).
    """
    if precision != "auto":
        return precision
    if runs_on_gpus(strategy):
        return "float32"
    if cpu_info is None:
        cpu_info = _read_cpu_info()
    return "mixed_bfloat16" if bfloat16_is_faster(cpu_info) else "float32"


def bfloat16_is_faster(cpu_info: str) -> bool:
    """Whether oneDNN's bfloat16 convolutions beat float32 on this CPU (`cpu_info`: /proc/cpuinfo's text).

    The rule follows the default step's speed in both precisions on each kind of CPU measured
    (docs/experiments.md): AMX (amx_bf16) counts on any CPU, AVX512-BF16 only on AMD CPUs (vendor
    "AuthenticAMD"); without either, bfloat16 is emulated and many times slower.
    """
    words = cpu_info.split()
    return has_bfloat16_instructions(cpu_info) and ("amx_bf16" in words or "AuthenticAMD" in words)


def has_bfloat16_instructions(cpu_info: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), faster than float32 or not."""
    words = (_read_cpu_info() if cpu_info is None else cpu_info).split()
    return "avx512_bf16" in words or "amx_bf16" in words


def runs_on_gpus(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy's replicas are GPUs (TensorFlow's default strategy runs on GPU:0 when one is visible)."""
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy has no device list of its own
        return bool(tf.config.get_visible_devices("GPU"))
    return any("GPU" in device.upper() for device in devices)


def _read_cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def configure_cpu_devices(count: int) -> list[str]:
    """Splits the physical CPU into `count` logical devices; returns their names.

    TensorFlow fixes the logical devices when its runtime starts, so a process that already has
    at least `count` CPU devices reuses the first `count` of them (as the test suite does).
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    if count > 1:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            pass  # already initialised: check below what we have
    available = tf.config.list_logical_devices("CPU")
    if len(available) < count:
        raise StrategyError(f"--cpu-replicas {count} needs {count} logical CPU devices, but TensorFlow was already "
                            f"started with {len(available)}; run it in a fresh process")
    return [device.name for device in available[:count]]


def _multi_worker(cpu_replicas: int | None) -> tf.distribute.Strategy:
    try:
        cluster = json.loads(os.environ["TF_CONFIG"])
        cluster["cluster"]["worker"], cluster["task"]["index"]
    except (ValueError, KeyError, TypeError) as error:
        raise StrategyError(f"TF_CONFIG is not a valid cluster spec ({error!r}); expected "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None
    if cpu_replicas:
        configure_cpu_devices(cpu_replicas)
    return tf.distribute.MultiWorkerMirroredStrategy()


def tf_config_json(worker_hosts: str | Sequence[str], task_index: int) -> str:
    """The TF_CONFIG (JSON) of worker `task_index` in a cluster of `worker_hosts` ("h1:p,h2:p" or a list).

    Every worker gets the same host list, in the same order, and its own index; worker 0 is the chief.
    """
    hosts = [host.strip() for host in (worker_hosts.split(",") if isinstance(worker_hosts, str) else worker_hosts)]
    if not hosts or not all(hosts):
        raise StrategyError(f"--worker-hosts {','.join(hosts)!r} must list host:port pairs separated by commas, "
                            "e.g. --worker-hosts node0:2222,node1:2222")
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise StrategyError(f"--worker-hosts entry {host!r} is not host:port (e.g. node0:2222)")
    if len(set(hosts)) != len(hosts):
        raise StrategyError(f"--worker-hosts lists a host:port twice: {','.join(hosts)}")
    if not 0 <= task_index < len(hosts):
        raise StrategyError(f"--task-index {task_index} must be between 0 and {len(hosts) - 1} "
                            f"(one index per --worker-hosts entry)")
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": task_index}})


def set_worker_cluster(worker_hosts: str | None, task_index: int | None, environ=os.environ) -> None:
    """Sets TF_CONFIG from --worker-hosts/--task-index (before the strategy exists); no-op when both are None.

    Refuses when TF_CONFIG is already set: two cluster specs for one process is a mistake either way.
    """
    if worker_hosts is None and task_index is None:
        return
    if worker_hosts is None or task_index is None:
        raise StrategyError("--worker-hosts and --task-index go together: pass both (or set TF_CONFIG instead)")
    if environ.get("TF_CONFIG"):
        raise StrategyError("TF_CONFIG is already set in the environment and --worker-hosts/--task-index were "
                            "given too; use one or the other (unset TF_CONFIG or drop the flags)")
    environ["TF_CONFIG"] = tf_config_json(worker_hosts, task_index)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True under MultiWorkerMirroredStrategy with a cluster spec (TF_CONFIG)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and bool(resolver.cluster_spec().as_dict())


def task_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's index (0 outside a cluster)."""
    return int(strategy.cluster_resolver.task_id) if is_multi_worker(strategy) else 0


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and samples (worker 0 without a chief job)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line: the strategy, its replica count and devices (printed at the start of training)."""
    try:
        devices = strategy.extended.worker_devices
    except (AttributeError, RuntimeError):  # the default strategy has no device list
        devices = [tf.config.list_logical_devices("GPU")[0].name if tf.config.list_physical_devices("GPU")
                   else tf.config.list_logical_devices("CPU")[0].name]
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # its class is still called CollectiveAllReduceStrategy
    else:
        name = type(strategy).__name__.lstrip("_").replace("DefaultDistributionStrategy", "default strategy")
    line = f"{name} with {strategy.num_replicas_in_sync} replica(s) on {', '.join(devices)}"
    if is_multi_worker(strategy):
        resolver = strategy.cluster_resolver
        workers = sum(len(resolver.cluster_spec().as_dict().get(job, [])) for job in ("chief", "worker"))
        role = " (chief)" if is_chief(strategy) else ""
        line += f"; {workers} worker(s), this is {resolver.task_type} {resolver.task_id}{role}"
    return line
