"""Sample grids, the progress animation, and the plumbing of the per-epoch judge the caller plugs in."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from common import images as image_grids
from trainer import models, summaries
from trainer.config import TrainConfig


def test_generate_function_gives_the_judge_images_in_0_1_and_the_gif_is_made_from_epoch_grids(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path))
    generator = models.build_generator_of(config)
    noise = np.random.default_rng(0).standard_normal((4, config.latent_dim)).astype(np.float32)
    images = summaries.generate_function(generator, True)(noise, np.array([1, 2, 3, 4], np.int32))
    assert images.shape == (4, 28, 28, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    raw = summaries.sample_images(generator, tf.constant(noise), tf.constant([1, 2, 3, 4]), True)
    np.testing.assert_allclose(images, np.clip((raw + 1.0) / 2.0, 0.0, 1.0), rtol=1e-6, atol=1e-6)
    fixed_noise, fixed_digits = summaries.fixed_sample_inputs(config)
    for epoch in (1, 2):
        summaries.write_samples(generator, config, fixed_noise, fixed_digits, epoch, step=epoch)
    summaries.write_progress_animation(config)
    assert (tmp_path / "samples" / "progress.gif").read_bytes().startswith(b"GIF89a")
    assert not image_grids.save_animation(tmp_path / "none.gif", [])


class _Judge:
    def __init__(self, fail: bool):
        self.fail, self.steps = fail, []

    def log(self, generate, step):
        if self.fail:
            raise ValueError("judge weights changed")
        images = generate(np.zeros((2, 100), np.float32), np.array([0, 9], np.int32))
        self.steps.append((step, images.shape))
        return f"judged step {step}"


def test_the_epoch_judge_is_built_from_the_run_and_turns_itself_off_on_errors():
    config = TrainConfig(seed=5, latent_dim=100)
    built = []

    def factory(mnist, seed, latent_dim, conditional):
        built.append((mnist, seed, latent_dim, conditional))
        return _Judge(fail=False)

    lines = []
    judge = summaries.start_epoch_judge(factory, config, "mnist", lines.append)
    assert built == [("mnist", 5, 100, True)]
    generator = models.build_generator_of(config)
    assert summaries.log_epoch_judge(judge, generator, True, 42, lines.append) is judge
    assert judge.steps == [(42, (2, 28, 28, 1))] and lines == ["judged step 42"]

    assert summaries.log_epoch_judge(_Judge(fail=True), generator, True, 43, lines.append) is None
    assert lines[-1] == "  quality figures turned off for this run: judge weights changed"

    def missing(*arguments):
        raise OSError("no weights")

    assert summaries.start_epoch_judge(missing, config, "mnist", lines.append) is None
    assert lines[-1] == "Per-epoch quality figures are off for this run: no weights"
