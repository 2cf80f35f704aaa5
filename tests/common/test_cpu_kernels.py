"""`cpu_kernels.use_onednn`: oneDNN's kernels on x86-64 unless the environment already chose."""
from __future__ import annotations

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
    assert cpu_kernels.os.environ[cpu_kernels.ONEDNN_VARIABLE] == "1"


def test_a_users_own_setting_wins(unset):
    unset.setenv(cpu_kernels.ONEDNN_VARIABLE, "0")
    cpu_kernels.use_onednn()
    assert cpu_kernels.os.environ[cpu_kernels.ONEDNN_VARIABLE] == "0"


def test_leaves_other_processors_to_tensorflow(unset):
    unset.setattr(platform, "machine", lambda: "aarch64")
    cpu_kernels.use_onednn()
    assert cpu_kernels.ONEDNN_VARIABLE not in cpu_kernels.os.environ
