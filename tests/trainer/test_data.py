"""The training input pipeline: each example once per epoch, in an order a resumed run repeats."""
from __future__ import annotations

import numpy as np

from trainer import data


def test_epoch_order_sees_each_example_once_and_resumes_mid_epoch():
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(28, 1).repeat(28, 2)
    labels = np.arange(100) % 10
    full = _epoch_examples(images, labels, skip=0)
    resumed = _epoch_examples(images, labels, skip=3)
    assert len(full) == 96 and len(set(full)) == 96  # 12 batches of 8, remainder dropped, no repeats
    assert resumed == full[3 * 8:]


def test_the_pipeline_runs_without_tf_data_autotuning():
    """With autotuning, deleting an epoch's iterator stalled about 4 s at half the epoch ends (docs/experiments.md)."""
    import tensorflow as tf

    images, labels = np.zeros((16, 28, 28, 1), np.uint8), np.zeros(16, np.int64)
    dataset = data.epoch_dataset_fn(images, labels, global_batch_size=8, seed=0, epoch=0)(tf.distribute.InputContext())
    assert dataset.options().autotune.enabled is False


def _epoch_examples(images, labels, skip):
    import tensorflow as tf

    dataset_fn = data.epoch_dataset_fn(images, labels, global_batch_size=8, seed=1, epoch=2, skip_batches=skip)
    dataset = dataset_fn(tf.distribute.InputContext())
    return [int(value) for batch, _ in dataset for value in batch[:, 0, 0, 0].numpy()]
