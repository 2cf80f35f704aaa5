"""Which CPU kernels TensorFlow runs: oneDNN's on every x86-64 CPU (no TensorFlow import at import time).

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it starts, and without it turns oneDNN's kernels
on only on x86 CPUs with AVX-512-class features. On an x86 CPU without them (AVX2 only) oneDNN ran
the training step, the judges and the generator faster than TensorFlow's own kernels
(`python -m bench.cpu_kernels`; docs/experiments.md), so every entry point asks for it, before it
imports TensorFlow. Where TensorFlow turns oneDNN on anyway, nothing changes.
"""
from __future__ import annotations

import os
import platform

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
X86_64 = ("x86_64", "amd64")
ONEDNN, EIGEN = "oneDNN", "TensorFlow's own (Eigen)"  # what `in_use` answers


def use_onednn() -> None:
    """TF_ENABLE_ONEDNN_OPTS=1 for this process and its children on x86-64, unless it is already set.

    A user's own TF_ENABLE_ONEDNN_OPTS (0 turns oneDNN off) wins. Has no effect once TensorFlow is
    imported, so call it first.
    """
    if platform.machine().lower() in X86_64:
        os.environ.setdefault(ONEDNN_VARIABLE, "1")


def in_use() -> str:
    """The kernels this process runs its CPU ops with: ONEDNN, or EIGEN (TensorFlow's own)."""
    from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own check; no public API answers it

    return ONEDNN if _pywrap_util_port.IsMklEnabled() else EIGEN
