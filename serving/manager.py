"""The version manager: version discovery, policies, labels, loading, warmup and hot swap.

Each model has a base path whose int64-named children are versions (TF Serving's
FileSystemStoragePathSource). A background thread rescans every `poll_seconds`, loads new
versions (servable.LoadedVersion, each in its own TF1 Graph + Session), replays the warmup
file, and only then lets the version take traffic and unloads the versions it replaces. A version that fails is reported (state END
with its error in GetModelStatus) and retried only when its directory changes.

A failed version is skipped: the policy then picks among the versions that load, so with
`latest {1}` and a broken newest version the newest version that loads is served (logged as a
warning). tensorflow_model_server keeps aspiring the broken one instead and, on a fresh start,
serves nothing until it loads; docs/serving.md lists this difference.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.errors import ServingError, invalid_argument
from serving.servable import LoadedVersion

LOG = logging.getLogger("serving.manager")
WARMUP_RELATIVE_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
STATE = get_model_status_pb2.ModelVersionStatus.State


@dataclass
class VersionStatus:
    state: int
    error_code: int = 0
    error_message: str = ""


class ModelEntry:
    """Loaded versions, status history and failed-directory memory of one model."""

    def __init__(self, config: model_server_config_pb2.ModelConfig):
        self.config = config
        self.loaded: dict[int, LoadedVersion] = {}
        self.status: dict[int, VersionStatus] = {}
        self.failed_fingerprints: dict[int, tuple] = {}
        self.fallback_note = ""  # the last "serving an older version" warning, so it is logged once


def discover_versions(base_path: str) -> dict[int, str]:
    """Map version number -> directory for children of base_path named as int64."""
    versions: dict[int, str] = {}
    try:
        children = sorted(os.listdir(base_path))
    except OSError:
        return versions
    for child in children:
        path = os.path.join(base_path, child)
        try:
            number = int(child, 10)
        except ValueError:
            continue  # TF Serving ignores non-numeric children, e.g. temp export dirs
        if not child.strip("0123456789") == "" or not os.path.isdir(path):
            continue
        if not 0 <= number < 2**63:
            continue
        if number in versions:
            LOG.warning("duplicate version directories for version %d under %s", number, base_path)
            continue
        versions[number] = path
    return versions


def select_versions(policy, available: list[int]) -> set[int]:
    """Apply a ServableVersionPolicy (latest N by default, all, specific) to version numbers."""
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return set(available)
    if which == "specific":
        return set(available) & set(policy.specific.versions)
    count = max(policy.latest.num_versions, 1) if which == "latest" else 1
    return set(sorted(available, reverse=True)[:count])


def directory_fingerprint(path: str) -> tuple:
    """Names, sizes and mtimes of every file, so a changed directory can be retried."""
    entries = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = os.path.abspath(base_path)
    model.model_platform = "tensorflow"
    return config


def validate_server_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Reject configs TF Serving's ServerCore rejects."""
    which = config.WhichOneof("config")
    if which == "custom_model_config":
        raise invalid_argument(errors.RELOAD_CONFIG_NOT_SUPPORTED)
    names = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise invalid_argument("Model config has no name")
        if model.name in names:
            raise invalid_argument(f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        if not os.path.isabs(model.base_path):
            raise invalid_argument(
                f"Expected model {model.name} to have an absolute path; got base_path()={model.base_path}")
        if model.model_platform not in ("", "tensorflow"):
            raise invalid_argument(f"Unsupported model_platform {model.model_platform!r} for {model.name}")


class ModelManager:
    """Keeps the configured models loaded and answers which version serves a request."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, poll_seconds: float,
                 warmup=None, on_change=None):
        validate_server_config(config)
        self._models: dict[str, ModelEntry] = {
            model.name: ModelEntry(model) for model in config.model_config_list.config}
        self._poll_seconds = poll_seconds
        self._warmup = warmup  # callable(LoadedVersion, path) raising on failure
        self._on_change = on_change
        self._lock = threading.Lock()  # guards _models' contents for readers
        self._poll_lock = threading.Lock()  # one scan/load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            entries = list(self._models.values())
        for entry in entries:
            for loaded in entry.loaded.values():
                loaded.retire()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a scan error must not kill the poller
                LOG.exception("model poll failed")
            if self._poll_seconds <= 0:
                return
            self._stop.wait(self._poll_seconds)

    # ---- scanning and loading ----
    def poll_once(self) -> None:
        with self._poll_lock:
            with self._lock:
                entries = list(self._models.values())
            for entry in entries:
                if self._stop.is_set():
                    return
                self._sync_model(entry)

    def _sync_model(self, entry: ModelEntry) -> None:
        found = discover_versions(entry.config.base_path)
        if not found and not entry.loaded:
            LOG.debug("No versions of servable %s found under base path %s", entry.config.name,
                      entry.config.base_path)
        candidates = [v for v, path in found.items() if not self._still_failed(entry, v, path)]
        wanted = select_versions(entry.config.model_version_policy, candidates)
        for version in sorted(wanted - set(entry.loaded), reverse=True):
            if self._stop.is_set():
                return
            self._load_version(entry, version, found[version])
        # Recompute: a version that just failed must not push out a working one.
        candidates = [v for v, path in found.items() if not self._still_failed(entry, v, path)]
        wanted = select_versions(entry.config.model_version_policy, candidates)
        self._note_fallback(entry, wanted, select_versions(entry.config.model_version_policy, list(found)))
        if not wanted & set(entry.loaded):
            return  # keep serving what we have rather than nothing
        for version in sorted(set(entry.loaded) - wanted):
            self._unload_version(entry, version)

    @staticmethod
    def _note_fallback(entry: ModelEntry, wanted: set[int], policy_choice: set[int]) -> None:
        """Log once when failed versions make us serve others than the policy names."""
        failed = sorted(policy_choice - wanted, reverse=True)
        note = ""
        if failed and wanted:
            note = (f"serving {entry.config.name} version(s) {sorted(wanted, reverse=True)} in place of "
                    f"version(s) {failed}, which failed to load (GetModelStatus has the error; a changed "
                    f"version folder is tried again)")
        if note and note != entry.fallback_note:
            LOG.warning("%s", note)
        entry.fallback_note = note

    def _still_failed(self, entry: ModelEntry, version: int, path: str) -> bool:
        if version not in entry.failed_fingerprints:
            return False
        if entry.failed_fingerprints[version] == directory_fingerprint(path):
            return True
        del entry.failed_fingerprints[version]  # directory changed: try again
        return False

    def _load_version(self, entry: ModelEntry, version: int, path: str) -> None:
        name = entry.config.name
        fingerprint = directory_fingerprint(path)
        with self._lock:  # GetModelStatus iterates entry.status under the lock; a new key must not race it
            entry.status[version] = VersionStatus(STATE.LOADING)
        LOG.info("loading %s version %d from %s", name, version, path)
        loaded = None
        try:
            loaded = LoadedVersion(name, version, path)
            self._run_warmup(loaded, path)
        except Exception as error:  # any load or warmup failure fails this version only
            if loaded is not None:
                loaded.retire()
            code, message = _error_code_and_message(error)
            LOG.error("failed to load %s version %d: %s", name, version, message)
            entry.failed_fingerprints[version] = fingerprint
            with self._lock:
                entry.status[version] = VersionStatus(STATE.END, code, message)
            self._notify()
            return
        with self._lock:
            entry.loaded[version] = loaded
            entry.status[version] = VersionStatus(STATE.AVAILABLE)
        LOG.info("%s version %d is available", name, version)
        self._notify()

    def _run_warmup(self, loaded: LoadedVersion, path: str) -> None:
        warmup_file = os.path.join(path, WARMUP_RELATIVE_PATH)
        if not os.path.exists(warmup_file):
            LOG.info("No warmup data file found at %s", warmup_file)
            return
        if self._warmup is not None:
            LOG.info("Starting to read warmup data for model at %s", warmup_file)
            self._warmup(loaded, warmup_file)
            LOG.info("Finished reading warmup data for model at %s", warmup_file)

    def _unload_version(self, entry: ModelEntry, version: int) -> None:
        with self._lock:
            loaded = entry.loaded.pop(version)
            entry.status[version] = VersionStatus(STATE.UNLOADING)
        loaded.retire()
        with self._lock:
            entry.status[version] = VersionStatus(STATE.END)
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # ---- config reload ----
    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Replace the model list (HandleReloadConfigRequest); blocks until loads finish."""
        validate_server_config(config)
        with self._poll_lock:
            with self._lock:
                old = self._models
                new_models = {}
                for model in config.model_config_list.config:
                    entry = old.get(model.name)
                    if entry is None or entry.config.base_path != model.base_path:
                        entry = ModelEntry(model)
                    entry.config = model
                    new_models[model.name] = entry
                self._models = new_models
                removed = [entry for name, entry in old.items() if new_models.get(name) is not entry]
            for entry in removed:
                for version in list(entry.loaded):
                    self._unload_version(entry, version)
            for entry in list(new_models.values()):
                self._sync_model(entry)
            self._check_labels(new_models.values())
        self._notify()

    def _check_labels(self, entries) -> None:
        for entry in entries:
            for label, version in entry.config.version_labels.items():
                if version not in entry.loaded:
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {entry.config.name}, "
                        "which is not currently available for inference")

    # ---- request side ----
    def acquire(self, model_spec) -> LoadedVersion:
        """Resolve a ModelSpec to a loaded version and take a reference (release() it)."""
        name = model_spec.name
        if not name:
            raise invalid_argument(errors.NO_MODEL_NAME)
        with self._lock:
            entry = self._models.get(name)
            choice = model_spec.WhichOneof("version_choice")
            if choice == "version_label":
                version = self._version_for_label(entry, model_spec.version_label)
                loaded = entry.loaded.get(version)
                request = f"Specific({name}, {version})"
            elif choice == "version":
                version = model_spec.version.value
                loaded = entry.loaded.get(version) if entry else None
                request = f"Specific({name}, {version})"
            else:
                loaded = entry.loaded[max(entry.loaded)] if entry and entry.loaded else None
                request = f"Latest({name})"
            if loaded is not None and loaded.acquire():
                return loaded
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")

    @staticmethod
    def _version_for_label(entry: ModelEntry | None, label: str) -> int:
        if entry is None or label not in entry.config.version_labels:
            raise invalid_argument(f"Unrecognized servable version label: {label}")
        return entry.config.version_labels[label]

    def version_statuses(self, name: str, version: int | None = None) -> list[tuple[int, VersionStatus]]:
        """Status of every known version, newest first (GetModelStatus)."""
        with self._lock:
            entry = self._models.get(name)
            statuses = sorted(entry.status.items(), reverse=True) if entry else []
        if not statuses:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        if version is None:
            return statuses
        for number, status in statuses:
            if number == version:
                return [(number, status)]
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")

    def base_paths(self) -> dict[str, str]:
        """Each configured model's base path."""
        with self._lock:
            return {name: entry.config.base_path for name, entry in self._models.items()}

    def available_models(self) -> dict[str, list[int]]:
        with self._lock:
            return {name: sorted(entry.loaded) for name, entry in self._models.items()}

    def has_available_version(self) -> bool:
        return any(self.available_models().values())

    def all_models_available(self) -> bool:
        models = self.available_models()
        return bool(models) and all(models.values())


def _error_code_and_message(error: Exception) -> tuple[int, str]:
    if isinstance(error, ServingError):
        return error.code.value[0], error.message
    if isinstance(error, tf.errors.OpError):
        return error.error_code, error.message
    return grpc.StatusCode.UNKNOWN.value[0], f"{type(error).__name__}: {error}"
