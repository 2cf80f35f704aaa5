"""The training input pipeline: the per-epoch example order and the `tf.data` `dataset_fn`.

MNIST itself (download, offline mirror, checks) comes from `mnist_data.acquire`; this module only
orders and batches the arrays it returns.
"""
from __future__ import annotations

import numpy as np

PREFETCH_BATCHES = 2  # batches ready ahead of the step: slicing uint8 arrays is far quicker than a step


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped, so every replica gets equal, static shapes)."""
    return num_examples // global_batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a permutation that depends only on (seed, epoch), so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_dataset_fn(images: np.ndarray, labels: np.ndarray, global_batch_size: int, seed: int, epoch: int,
                     skip_batches: int = 0):
    """A `dataset_fn(input_context)` for `strategy.distribute_datasets_from_function` covering one epoch.

    Yields per-replica batches (images uint8 [b, 28, 28, 1], digits int32 [b]) of the
    epoch's permutation, starting after `skip_batches` global batches (resume mid-epoch), so each
    example is seen once per epoch. Under several workers each input pipeline takes its shard.
    """
    import tensorflow as tf

    order = epoch_order(len(images), seed, epoch)
    used = steps_per_epoch(len(images), global_batch_size) * global_batch_size
    order = order[skip_batches * global_batch_size:used]

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch_size)
        shard = order[input_context.input_pipeline_id::input_context.num_input_pipelines]
        dataset = tf.data.Dataset.from_tensor_slices((images[shard], labels[shard].astype(np.int32)))
        # Batches stay uint8 (a quarter of the bytes to copy); the step scales them inside its
        # compiled graph, which was faster than a tf.data map (docs/experiments.md).
        dataset = dataset.batch(per_replica, drop_remainder=True).prefetch(PREFETCH_BATCHES)
        # No tf.data autotuning: with it, deleting an epoch's iterator stalled some epoch ends
        # (docs/experiments.md); two batches ahead are plenty here.
        options = tf.data.Options()
        options.autotune.enabled = False
        return dataset.with_options(options)

    return dataset_fn

