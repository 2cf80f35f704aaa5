"""What a run shows while it trains: TensorBoard scalars and images, the fixed-noise sample grids,
the progress animation, and the per-epoch judge the caller may plug in.

The trainer knows no judge: `loop.train` receives an `EpochJudgeFactory` (the CLI passes
`quality.epochs.EpochQuality`), as `export_bundle` receives its blessing gate, so `trainer/` and
`quality/` never import each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import tensorflow as tf

from common import images as image_grids
from mnist_data.acquire import Mnist
from trainer import models
from trainer.config import TrainConfig

SAMPLES_PER_DIGIT = 10  # the sample grid: one row per digit (conditional) or 100 fixed noises

# generate(noise float32 [N, latent_dim], digits int32 [N]) -> images float32 [N, 28, 28, 1] in [0, 1]
# (0 = background, 1 = ink); unconditional generators ignore the digits.
GenerateFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


class EpochJudge(Protocol):
    """Judges the generator after an epoch (chief only) and logs its figures as TensorBoard scalars."""

    def log(self, generate: GenerateFunction, step: int) -> str:
        """Judges images from `generate`, writes scalars at `step` (the default writer), returns one line."""
        ...


# factory(mnist, seed, latent_dim, conditional) -> EpochJudge; called once per run, before the clock
# starts. It may raise ValueError or OSError (e.g. the judge's weights are missing or changed).
EpochJudgeFactory = Callable[[Mnist, int, int, bool], EpochJudge]


def writer(config: TrainConfig, chief: bool):
    """The run's TensorBoard writer (`<run_dir>/logs`) on the chief; a writer that writes nothing elsewhere."""
    return tf.summary.create_file_writer(str(Path(config.run_dir) / "logs")) if chief else tf.summary.create_noop_writer()


def log_losses(generator_loss: float, discriminator_loss: float, step: int) -> None:
    tf.summary.scalar("loss/generator", generator_loss, step=step)
    tf.summary.scalar("loss/discriminator", discriminator_loss, step=step)


def fixed_sample_inputs(config: TrainConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """The noise (and digits: one row per digit) that every epoch's sample grid uses."""
    count = models.NUM_CLASSES * SAMPLES_PER_DIGIT
    noise = tf.constant(np.random.default_rng(config.seed).standard_normal((count, config.latent_dim)), tf.float32)
    digits = tf.constant(np.repeat(np.arange(models.NUM_CLASSES), SAMPLES_PER_DIGIT), tf.int32)
    return noise, digits


def sample_images(generator, noise, digits, conditional: bool) -> np.ndarray:
    """Generator output in inference mode (BatchNorm moving statistics): float32 [N, 28, 28, 1] in [-1, 1]."""
    return generator(models.generator_inputs(noise, digits, conditional), training=False).numpy()


def generate_function(generator, conditional: bool) -> GenerateFunction:
    """`generator` as an epoch judge sees it: images in [0, 1], the judge's range."""
    def generate(noise: np.ndarray, digits: np.ndarray) -> np.ndarray:
        images = sample_images(generator, tf.constant(noise, tf.float32), tf.constant(digits, tf.int32), conditional)
        return np.clip((images + 1.0) / 2.0, 0.0, 1.0)

    return generate


def write_samples(generator, config: TrainConfig, noise, digits, epoch: int | None, step: int) -> None:
    """Writes `samples/epoch_NNN.png` (or `samples/step_NNNNNNN.png` mid-epoch) and a TensorBoard image summary."""
    pictures = sample_images(generator, noise, digits, config.conditional)
    name = f"epoch_{epoch:03d}.png" if epoch is not None else f"step_{step:07d}.png"
    path = Path(config.run_dir) / "samples" / name
    image_grids.save_grid(path, pictures, columns=SAMPLES_PER_DIGIT, value_range=(-1.0, 1.0))
    tf.summary.image("samples", (pictures[:SAMPLES_PER_DIGIT * 4] + 1.0) / 2.0, step=step, max_outputs=40)


def write_progress_animation(config: TrainConfig) -> None:
    """`samples/progress.gif` from the epoch grids, as the TensorFlow DCGAN tutorial makes."""
    samples = Path(config.run_dir) / "samples"
    image_grids.save_animation(samples / "progress.gif", sorted(samples.glob("epoch_*.png")))


def start_epoch_judge(factory: EpochJudgeFactory, config: TrainConfig, mnist: Mnist,
                      report: Callable[[str], None]) -> EpochJudge | None:
    """The per-epoch judge, or None when it cannot be had (its weights missing or changed): the
    figures are a nicety, so that turns them off with one line, never stops training."""
    try:
        return factory(mnist, config.seed, config.latent_dim, config.conditional)
    except (ValueError, OSError) as error:
        report(f"Per-epoch quality figures are off for this run: {error}")
        return None


def log_epoch_judge(judge: EpochJudge, generator, conditional: bool, step: int,
                    report: Callable[[str], None]) -> EpochJudge | None:
    """Logs the epoch's figures; returns `judge` to reuse, or None when judging failed."""
    try:
        report(judge.log(generate_function(generator, conditional), step))
        return judge
    except (ValueError, OSError) as error:
        report(f"  quality figures turned off for this run: {error}")
        return None
