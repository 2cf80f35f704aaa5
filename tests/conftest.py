"""Shared test set-up: 2 logical CPU devices (MirroredStrategy on a CPU-only machine), real MNIST, tiny runs.

TensorFlow fixes its logical devices when its runtime starts, so the split happens here, before
any test touches TensorFlow.
"""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

from common import cpu_kernels

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
cpu_kernels.use_onednn()  # the kernels `cli.py` runs with; its subprocesses here inherit the choice

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

REPO = Path(__file__).resolve().parent.parent
# A TFDS data dir reused across test sessions on one machine (CI starts without it), so the
# 20 MB mirror download and the conversion happen once; tests that need an EMPTY data
# dir use their own tmp dir.
SHARED_DATA_DIR = Path(os.environ.get("DIGITGAN_TEST_DATA_DIR", REPO / ".test-data" / "tensorflow_datasets"))


def pytest_collection_modifyitems(items):
    """A soak test is slow too, so the fast lane (`-m "not slow"`, which replaces pyproject's
    `-m "not soak"`) never picks one up."""
    for item in items:
        if item.get_closest_marker("soak") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def float32_keras_policy():
    """Every test starts under Keras's float32 policy, and what it sets (a bfloat16 training run does)
    is undone afterwards: the policy is process-global, and later tests build float32 models."""
    from common import precision

    with precision.float32_policy():
        yield


@pytest.fixture(scope="session")
def mnist_data_dir() -> str:
    """A TFDS data dir holding real MNIST, prepared through the offline mirror path."""
    from mnist_data import acquire

    with mock.patch.object(acquire, "host_reachable", return_value=False):
        acquire.load_mnist(str(SHARED_DATA_DIR))
    return str(SHARED_DATA_DIR)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, mnist_data_dir) -> dict:
    """Two tiny trained runs (conditional and unconditional), 4 steps each, on 2 logical CPUs, in float32.

    The precision is pinned: "auto" trains in bfloat16 on some CPUs and float32 on others. A bfloat16
    run is exported in tests/export/test_bundle.py, where the CPU has bfloat16 instructions."""
    from trainer import loop
    from trainer.config import TrainConfig

    runs = {}
    for name, conditional in (("conditional", True), ("unconditional", False)):
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        config = TrainConfig(run_dir=str(run_dir), data_dir=mnist_data_dir, conditional=conditional, max_steps=4,
                             batch_size=16, cpu_replicas=2, steps_per_call=2, checkpoint_every_steps=2,
                             precision="float32")
        loop.train(config, report=lambda line: None, progress=False)
        runs[name] = str(run_dir)
    return runs

