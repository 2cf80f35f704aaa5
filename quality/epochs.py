"""Cheap per-epoch figures for TensorBoard: both shipped MNIST judges on a fixed sample of 1,000 images.

`EpochQuality` is the judge `trainer.loop.train` calls after each epoch when the caller plugs it in
(`python cli.py train` does unless `--set evaluate_every_epoch=false`); it sees the generator only as a
function from noise and digits to images, so it imports nothing of the trainer.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from quality import judge as judge_lib, measures


class EpochQuality:
    """Figures from 1,000 samples under each shipped judge, logged as `quality/<figure>_<judge>`.

    - KID (`quality/kid_<judge>`): unbiased at any sample size, so the 1,000-sample figure estimates
      what 10,000 samples would give; 0 when the samples are distributed as real test digits. The
      figure to follow from epoch to epoch.
    - The Fréchet ratio (`quality/frechet_ratio_<judge>`): biased upwards at 1,000 samples, well
      above what `cli.py evaluate` gives on 10,000, so it is comparable from epoch to epoch but is
      not the final figure; the printed line says so.
    - MNIST score and, for conditional models, conditional accuracy.

    `mnist` is `mnist_data.acquire.Mnist` (its test split is the reference); `seed` and `latent_dim`
    fix the judged noise, float32 [1000, latent_dim], drawn from its own stream ([seed, 1]) so it
    never overlaps the sample grid's noise. KID's real subsets are the same in every run and epoch.
    """

    SAMPLES = 1000  # each digit in its share of the real test split
    KID_SUBSETS = 10

    def __init__(self, mnist, seed: int, latent_dim: int, conditional: bool):
        self.judges = judge_lib.load_judges()  # the shipped judges: figures compare across machines and runs
        count = self.SAMPLES
        # Only the real test split is read here (before the training clock starts): the Fréchet ratio's
        # denominator, real train against real test, is the judge's manifest's calibration figure.
        # Precision and recall are left out: at 1,000 samples recall means little.
        test_images = judge_lib.real_images(mnist.test_images)
        self.test_moments, self.kernels = [], []
        for judge in self.judges:
            test_features, _ = judge.read(test_images)
            self.test_moments.append(judge_lib.moments(test_features))
            self.kernels.append(measures.KernelDistanceTo(test_features, self.KID_SUBSETS, subset_size=count))
        self.conditional = conditional
        self.noise = np.random.default_rng([seed, 1]).standard_normal((count, latent_dim)).astype(np.float32)
        self.digits = judge_lib.digits_in_proportion(mnist.test_labels, count)  # as `evaluate` asks for them

    def log(self, generate: Callable[[np.ndarray, np.ndarray], np.ndarray], step: int) -> str:
        """Judges `generate(noise, digits)` (float32 [1000, 28, 28, 1] in [0, 1]), writes `quality/*`
        scalars at `step` to the default TensorBoard writer, returns a two-line summary."""
        import tensorflow as tf

        images = generate(self.noise, self.digits)
        kids, ratios, scores, accuracies = [], [], [], []
        for judge, test_moments, kernel in zip(self.judges, self.test_moments, self.kernels):
            features, probabilities = judge.read(images)
            kid = kernel(features)
            real_vs_real = judge.manifest["calibration"]["real_train_vs_real_test_frechet"]
            ratio = judge_lib.frechet_between(judge_lib.moments(features), test_moments) / real_vs_real
            score = judge_lib.mnist_score(probabilities)
            tf.summary.scalar(f"quality/kid_{judge.name}", kid.mean, step=step)
            tf.summary.scalar(f"quality/frechet_ratio_{judge.name}", ratio, step=step)
            tf.summary.scalar(f"quality/mnist_score_{judge.name}", score, step=step)
            kids.append(f"{kid.mean:.4f} ± {kid.spread:.4f}")
            ratios.append(f"{ratio:.2f}")
            scores.append(f"{score:.2f}")
            if self.conditional:
                accuracy, _ = judge_lib.conditional_accuracy(probabilities, self.digits)
                tf.summary.scalar(f"quality/conditional_accuracy_{judge.name}", accuracy, step=step)
                accuracies.append(f"{accuracy:.2%}")
        names = " / ".join(judge.name for judge in self.judges)
        line = f"  quality on {len(images)} samples, judges {names}: KID {' / '.join(kids)}, MNIST score {' / '.join(scores)}"
        if accuracies:
            line += f", conditional accuracy {' / '.join(accuracies)}"
        return line + f"\n  Fréchet ratio (1k samples, biased up: not the final figure) {' / '.join(ratios)}"
