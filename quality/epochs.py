"""Cheap per-epoch figures for TensorBoard: the shipped MNIST judge on a fixed sample of 100 images per digit.

`EpochQuality` is the judge `trainer.loop.train` calls after each epoch when the caller plugs it in
(`python cli.py train` does unless `--set evaluate_every_epoch=false`); it sees the generator only as a
function from noise and digits to images, so it imports nothing of the trainer.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from quality import judge as judge_lib

NUM_CLASSES = judge_lib.NUM_CLASSES


class EpochQuality:
    """Figures from 1,000 samples: the Fréchet ratio is biased upwards against `cli.py evaluate`'s
    10,000-sample figure, but comparable from epoch to epoch, which is what a curve needs.

    `mnist` is `mnist_data.acquire.Mnist` (its test split is the reference); `seed` and `latent_dim`
    fix the judged noise, float32 [1000, latent_dim], drawn from its own stream ([seed, 1]) so it
    never overlaps the sample grid's noise.
    """

    PER_DIGIT = 100

    def __init__(self, mnist, seed: int, latent_dim: int, conditional: bool):
        self.judge = judge_lib.load_judge()  # the shipped judge: figures compare across machines and runs
        self.reference = judge_lib.reference(self.judge, mnist)
        self.conditional = conditional
        count = NUM_CLASSES * self.PER_DIGIT
        self.noise = np.random.default_rng([seed, 1]).standard_normal((count, latent_dim)).astype(np.float32)
        self.digits = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), self.PER_DIGIT)

    def log(self, generate: Callable[[np.ndarray, np.ndarray], np.ndarray], step: int) -> str:
        """Judges `generate(noise, digits)` (float32 [1000, 28, 28, 1] in [0, 1]), writes `quality/*`
        scalars at `step` to the default TensorBoard writer, returns a one-line summary."""
        import tensorflow as tf

        images = generate(self.noise, self.digits)
        requested = self.digits if self.conditional else None
        row = judge_lib.judge_images(self.judge, self.reference, f"step {step}",
                                     images if self.conditional else None, requested, images)
        tf.summary.scalar("quality/mnist_score", row.mnist_score, step=step)
        tf.summary.scalar("quality/frechet_ratio", row.frechet_ratio, step=step)
        line = f"  quality on {len(images)} samples: MNIST score {row.mnist_score:.2f}, Fréchet ratio {row.frechet_ratio:.2f}"
        if row.conditional_accuracy is not None:
            tf.summary.scalar("quality/conditional_accuracy", row.conditional_accuracy, step=step)
            line += f", conditional accuracy {row.conditional_accuracy:.2%}"
        return line

