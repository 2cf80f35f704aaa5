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
def test_epoch_quality_logs_both_judges_figures(tmp_path, mnist_data_dir):
    """The per-epoch hook judges a fixed sample of 1,000 under both shipped judges and writes
    quality/<figure>_<judge> scalars, KID among them; its line says the Fréchet ratio is biased."""
    mnist = acquire.load_mnist(mnist_data_dir)
    quality = epochs.EpochQuality(mnist, seed=0, latent_dim=100, conditional=True)
    writer = tf.summary.create_file_writer(str(tmp_path / "logs"))
    with writer.as_default():
        line = quality.log(_real_digits(mnist), step=7)
        noise_line = quality.log(lambda noise, digits: np.random.default_rng(0).uniform(
            0.0, 1.0, (len(digits), 28, 28, 1)).astype(np.float32), step=8)
    writer.flush()
    assert "quality on 1000 samples, judges small / wide: KID" in line and "conditional accuracy" in line
    assert "Fréchet ratio (1k samples, biased up: not the final figure)" in line and "KID" in noise_line
    scalars = {(value.tag, event.step): float(tf.make_ndarray(value.tensor))
               for path in (tmp_path / "logs").glob("events.out.tfevents.*")
               for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value}
    for judge in ("small", "wide"):
        assert {f"quality/{figure}_{judge}" for figure in ("kid", "mnist_score", "frechet_ratio", "conditional_accuracy")} \
            <= {tag for tag, _ in scalars}
        # Real digits, read by a judge with 99% test accuracy: the figures say so.
        assert scalars[(f"quality/conditional_accuracy_{judge}", 7)] > 0.97
        assert scalars[(f"quality/mnist_score_{judge}", 7)] > 9.0
        # KID: real test digits against real test digits is near 0; noise is far.
        real_kid, noise_kid = scalars[(f"quality/kid_{judge}", 7)], scalars[(f"quality/kid_{judge}", 8)]
        assert abs(real_kid) < 0.02 * noise_kid, (judge, real_kid, noise_kid)
