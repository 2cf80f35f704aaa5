"""The per-epoch judge that `cli.py train` plugs into the training loop: figures and TensorBoard scalars."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mnist_data import acquire
from quality import epochs


def _real_digits(mnist: acquire.Mnist):
    """A stand-in generator that draws real test images of the digits asked for: float32 in [0, 1]."""
    def generate(noise: np.ndarray, digits: np.ndarray) -> np.ndarray:
        assert noise.dtype == np.float32 and noise.shape == (len(digits), 100)
        pools = {digit: mnist.test_images[mnist.test_labels == digit] for digit in range(10)}
        taken = {digit: 0 for digit in range(10)}
        images = []
        for digit in digits.tolist():
            images.append(pools[digit][taken[digit]])
            taken[digit] += 1
        return np.stack(images).astype(np.float32) / 255.0

    return generate


@pytest.mark.slow
def test_epoch_quality_logs_the_judges_figures(tmp_path, mnist_data_dir):
    """The per-epoch hook judges a fixed sample of 1,000 and writes quality/* scalars."""
    mnist = acquire.load_mnist(mnist_data_dir)
    quality = epochs.EpochQuality(mnist, seed=0, latent_dim=100, conditional=True)
    writer = tf.summary.create_file_writer(str(tmp_path / "logs"))
    with writer.as_default():
        line = quality.log(_real_digits(mnist), step=7)
    writer.flush()
    assert "quality on 1000 samples" in line and "conditional accuracy" in line
    scalars = {value.tag: float(tf.make_ndarray(value.tensor)) for path in (tmp_path / "logs").glob("events.out.tfevents.*")
               for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value}
    assert {"quality/mnist_score", "quality/frechet_ratio", "quality/conditional_accuracy"} <= set(scalars)
    # Real digits, read by a judge with 99% test accuracy: the figures say so.
    assert scalars["quality/conditional_accuracy"] > 0.97 and scalars["quality/mnist_score"] > 9.0

