"""`common.cpu_kernels`: oneDNN's kernels on x86-64 unless the environment already chose, and which run."""
from __future__ import annotations

import os
import platform

import pytest

from common import cpu_kernels


@pytest.fixture
def unset(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ONEDNN_VARIABLE, raising=False)
    return monkeypatch


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_turns_onednn_on_for_x86_64(unset, machine):
    unset.setattr(platform, "machine", lambda: machine)
    cpu_kernels.use_onednn()
    assert os.environ[cpu_kernels.ONEDNN_VARIABLE] == "1"


def test_a_users_own_setting_wins(unset):
    unset.setenv(cpu_kernels.ONEDNN_VARIABLE, "0")
    cpu_kernels.use_onednn()
    assert os.environ[cpu_kernels.ONEDNN_VARIABLE] == "0"


def test_leaves_other_processors_to_tensorflow(unset):
    unset.setattr(platform, "machine", lambda: "aarch64")
    cpu_kernels.use_onednn()
    assert cpu_kernels.ONEDNN_VARIABLE not in os.environ


def test_the_test_session_runs_the_kernels_cli_py_asks_for():
    """conftest asks for oneDNN before TensorFlow starts; on x86-64 TensorFlow then runs it."""
    if platform.machine().lower() not in cpu_kernels.X86_64:
        pytest.skip("not x86-64: TensorFlow chooses its own kernels here")
    if os.environ.get(cpu_kernels.ONEDNN_VARIABLE) == "0":
        pytest.skip("TF_ENABLE_ONEDNN_OPTS=0 was set for this test session")
    assert cpu_kernels.in_use() == cpu_kernels.ONEDNN
