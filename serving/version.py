"""`serve --version`: this project's version and TensorFlow's, as tensorflow_model_server's
`--version` prints its own and its TensorFlow library's. No TensorFlow import (it is slow)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tomllib
from pathlib import Path

from serving.config import tfserving_binary

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project_version() -> str:
    """The installed digitgan's version, else pyproject.toml's (a clone run without installing)."""
    try:
        return importlib.metadata.version("digitgan")
    except importlib.metadata.PackageNotFoundError:
        with open(PYPROJECT, "rb") as handle:
            return tomllib.load(handle)["project"]["version"]


def version_lines() -> list[str]:
    tensorflow = "not installed"
    for distribution in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            tensorflow = importlib.metadata.version(distribution)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return [f"digitgan ModelServer: {project_version()}", f"TensorFlow Library: {tensorflow}"]


def exec_tfserving_version() -> None:
    """Replace this process with `tensorflow_model_server --version` (ValueError when it is missing)."""
    binary = tfserving_binary()
    sys.stdout.flush()
    os.execv(binary, [binary, "--version"])
