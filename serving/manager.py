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
TENSORFLOW_PLATFORM = "tensorflow"  # kTensorFlowModelPlatform


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
        # Why no version could be served, when every version the policy names failed to load
        # ("" otherwise); a server still starting gives up on it, as tensorflow_model_server does.
        self.load_failure = ""


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
    model.model_platform = TENSORFLOW_PLATFORM
    return config


def validate_server_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Reject configs TF Serving's ServerCore rejects, with its texts."""
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
                f"Expected model {model.name} to have an absolute path or URI; got base_path()={model.base_path}")
        platform = model_platform(model)
        if platform != TENSORFLOW_PLATFORM:
            raise invalid_argument(f"Model {model.name} requests unsupported platform {platform}")


def model_platform(model: model_server_config_pb2.ModelConfig) -> str:
    """The model's platform as server_core.cc's GetPlatform reads it (INVALID_ARGUMENT when unset)."""
    if model.model_type != model_server_config_pb2.MODEL_TYPE_UNSPECIFIED:  # deprecated field
        if model.model_platform:
            raise invalid_argument("Illegal setting both ModelServerConfig::model_type (deprecated) and "
                                   f"ModelServerConfig::model_platform, model name is {model.name}")
        if model.model_type != model_server_config_pb2.TENSORFLOW:
            raise invalid_argument(f"ModelServerConfig::model_type choice {model.model_type} not supported.")
        return TENSORFLOW_PLATFORM
    if not model.model_platform:
        raise invalid_argument("Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                               f"ModelServerConfig::model_platform, model name is {model.name}")
    return model.model_platform


class ModelManager:
    """Keeps the configured models loaded and answers which version serves a request.

    `loader(name, version, path)` makes a LoadedVersion (the server passes the tags and the
    method-name check); `warmup(loaded, path)` replays a warmup file, raising on failure.
    Version labels live apart from the config, as in TF Serving's ServerCore: a config whose
    labels are refused changes nothing, and the labels in force stay.
    """

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, poll_seconds: float,
                 warmup=None, on_change=None, loader=LoadedVersion,
                 allow_version_labels_for_unavailable_models: bool = False):
        validate_server_config(config)
        self._poll_seconds = poll_seconds
        self._warmup = warmup  # callable(LoadedVersion, path) raising on failure
        self._on_change = on_change
        self._loader = loader
        self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._lock = threading.Lock()  # guards _models' and _labels' contents for readers
        self._poll_lock = threading.Lock()  # one scan/load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._models: dict[str, ModelEntry] = {}
        self._labels: dict[str, dict[str, int]] = {}
        # At start nothing is AVAILABLE, so any label is refused unless the flag allows it.
        self._labels = self._label_map(config)
        self._models = {model.name: ModelEntry(model) for model in config.model_config_list.config}
        self.config = config  # the ModelServerConfig in force (the last one accepted)

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
        base_path = entry.config.base_path
        if not os.path.isdir(base_path):
            # FileSystemStoragePathSource fails the poll ("Could not find base path"): no change.
            LOG.debug("Could not find base path %s for servable %s", base_path, entry.config.name)
            return
        found = discover_versions(base_path)
        policy = entry.config.model_version_policy
        policy_choice = select_versions(policy, list(found))
        if not policy_choice:
            # Nothing to aspire (every version folder deleted, or none the policy names): TF
            # Serving's source aspires no version and the manager unloads every one.
            if not entry.loaded:
                LOG.debug("No versions of servable %s found under base path %s", entry.config.name, base_path)
            for version in sorted(entry.loaded):
                self._unload_version(entry, version)
            self._set_load_failure(entry, "")
            return
        candidates = [v for v, path in found.items() if not self._still_failed(entry, v, path)]
        wanted = select_versions(policy, candidates)
        for version in sorted(wanted - set(entry.loaded), reverse=True):
            if self._stop.is_set():
                return
            self._load_version(entry, version, found[version])
        # Recompute: a version that just failed must not push out a working one.
        candidates = [v for v, path in found.items() if not self._still_failed(entry, v, path)]
        wanted = select_versions(policy, candidates)
        self._note_fallback(entry, wanted, policy_choice)
        self._set_load_failure(entry, "" if entry.loaded or wanted else self._failure_text(entry, policy_choice))
        if not wanted & set(entry.loaded):
            return  # keep serving what we have rather than nothing (AvailabilityPreservingPolicy)
        for version in sorted(set(entry.loaded) - wanted):
            self._unload_version(entry, version)

    def _set_load_failure(self, entry: ModelEntry, text: str) -> None:
        if entry.load_failure != text:
            entry.load_failure = text
            self._notify()

    @staticmethod
    def _failure_text(entry: ModelEntry, versions: set[int]) -> str:
        """Each failed version as ServerCore words it: {name: M version: V} due to error: CODE: text."""
        parts = []
        for version in sorted(versions, reverse=True):
            status = entry.status.get(version)
            if status is not None and status.error_code:
                parts.append(f"{{name: {entry.config.name} version: {version}}} due to error: "
                             f"{errors.status_code(status.error_code).name}: {status.error_message}")
        return ", ".join(parts)

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
            loaded = self._loader(name, version, path)
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
        if self._warmup is None:  # --enable_model_warmup=false: the file is not read
            return
        warmup_file = os.path.join(path, WARMUP_RELATIVE_PATH)
        if not os.path.exists(warmup_file):
            LOG.info("No warmup data file found at %s", warmup_file)
            return
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
        """Replace the model list (HandleReloadConfigRequest); blocks until loads finish.

        As ServerCore::ReloadConfig: the labels are checked first, against the versions
        AVAILABLE now; a refused label refuses the whole config, leaving models and labels as
        they were.
        """
        validate_server_config(config)
        with self._poll_lock:
            with self._lock:
                self._labels = self._label_map(config)
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
            self.config = config
            for entry in list(new_models.values()):
                self._sync_model(entry)
        self._notify()

    def _label_map(self, config: model_server_config_pb2.ModelServerConfig) -> dict[str, dict[str, int]]:
        """The labels of `config`, checked as ServerCore::UpdateModelVersionLabelMap checks them.

        A label must name a version AVAILABLE now. With allow_version_labels_for_unavailable_models
        a label may name any version, unless it already names another one (moving a label still
        needs the new version AVAILABLE). Call with self._lock held (or before the poller starts).
        """
        labels: dict[str, dict[str, int]] = {}
        for model in config.model_config_list.config:
            entry = self._models.get(model.name)
            available = set(entry.loaded) if entry is not None else set()
            for label, version in model.version_labels.items():
                current = self._labels.get(model.name, {}).get(label)
                allowed = self._allow_unavailable_labels and current in (None, version)
                if not allowed and version not in available:
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"Request to assign label to version {version} of model {model.name}, "
                                       "which is not currently available for inference")
                labels.setdefault(model.name, {})[label] = version
        return labels

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
                version = self._version_for_label(name, model_spec.version_label)
                loaded = entry.loaded.get(version) if entry else None
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

    def _version_for_label(self, name: str, label: str) -> int:
        version = self._labels.get(name, {}).get(label)
        if version is None:
            raise invalid_argument(f"Unrecognized servable version label: {label}")
        return version

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
        """Whether every configured model has an AVAILABLE version (True with no models)."""
        return all(self.available_models().values())

    def initial_load_outcome(self) -> tuple[bool, list[str]]:
        """(settled, failures): settled once every model has an AVAILABLE version or has failed,
        i.e. every version its policy names failed to load; each failure as ServerCore words
        it at start-up (`{name: M version: V} due to error: CODE: text`)."""
        with self._lock:
            entries = list(self._models.values())
            settled = all(entry.loaded or entry.load_failure for entry in entries)
            return settled, [entry.load_failure for entry in entries if entry.load_failure]


def _error_code_and_message(error: Exception) -> tuple[int, str]:
    if isinstance(error, ServingError):
        return error.code.value[0], error.message
    if isinstance(error, tf.errors.OpError):
        return error.error_code, error.message
    return grpc.StatusCode.UNKNOWN.value[0], f"{type(error).__name__}: {error}"
