"""`evaluate`'s sheet of least real-looking images, from a real (tiny) bundle: 64 cells, least real
first, each image the one its label's digit and seed give."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from common import images as image_grids
from mnist_data import acquire
from quality import judge as judge_lib, sources


@pytest.mark.slow
def test_the_sheet_shows_the_least_real_images_with_their_digit_and_seed(tiny_runs, mnist_data_dir, tmp_path):
    from export import bundle

    exported = bundle.export_bundle(bundle.ExportConfig(run_dir=tiny_runs["conditional"],
                                                        model_base_path=str(tmp_path / "models")))
    config = sources.EvaluateConfig(per_digit=10, default_samples=20, data_dir=mnist_data_dir,
                                    sheet=str(tmp_path / "least_real.png"), missed_sheet=str(tmp_path / "missed.png"))
    evaluation = sources.evaluate_bundle(exported.path, config, report=lambda line: None, progress=False)
    sheet = evaluation.sheet
    assert sheet.path == config.sheet and len(sheet.labels) == sources.SHEET_SIZE == 64
    assert len(set(sheet.labels)) == 64 and list(sheet.scores) == sorted(sheet.scores)  # least real first
    picture = np.asarray(Image.open(sheet.path))
    size, padding, columns = 28 * 3, 2, sources.SHEET_COLUMNS
    cell = size + image_grids.LABEL_HEIGHT
    header = 2 * image_grids.HEADER_HEIGHT  # a two-line caption
    assert picture.shape == (header + 8 * (cell + padding) + padding, columns * (size + padding) + padding)
    sampler = sources.SignatureSampler(exported.path)
    asked = judge_lib.digits_in_proportion(acquire.load_mnist(mnist_data_dir).test_labels, config.per_digit * 10)
    for index, label in enumerate(sheet.labels):
        digit, seed = (int(part) for part in re.fullmatch(r"(\d) s(\d+)", label).groups())
        assert asked[seed - config.seed] == digit  # the digit evaluate asked for with that seed
        expected = image_grids.to_uint8(sampler.sample(np.array([digit]), np.array([seed])))[0]
        row, column = divmod(index, columns)
        top, left = header + padding + row * (cell + padding), padding + column * (size + padding)
        shown = picture[top:top + size:3, left:left + size:3]
        assert np.abs(shown.astype(int) - expected).max() <= 1, label  # the image its label names
        assert picture[top + size:top + cell, left:left + size].max() > 200, label  # the label is written under it
    _check_missed_sheet(evaluation.missed_sheet, config, mnist_data_dir)


def _check_missed_sheet(sheet, config, mnist_data_dir):
    """The missed sheet: 64 real test digits, the farthest from the generated set first, each the test
    image its label names."""
    mnist = acquire.load_mnist(mnist_data_dir)
    assert sheet.path == config.missed_sheet and len(set(sheet.labels)) == sources.SHEET_SIZE
    assert list(sheet.scores) == sorted(sheet.scores, reverse=True) and min(sheet.scores) > 1.0  # none of them covered
    picture = np.asarray(Image.open(sheet.path))
    size, padding, columns = 28 * 3, 2, sources.SHEET_COLUMNS
    cell, header = size + image_grids.LABEL_HEIGHT, 2 * image_grids.HEADER_HEIGHT
    for index, label in enumerate(sheet.labels):
        digit, position = (int(part) for part in re.fullmatch(r"(\d) #(\d+)", label).groups())
        assert mnist.test_labels[position] == digit
        row, column = divmod(index, columns)
        top, left = header + padding + row * (cell + padding), padding + column * (size + padding)
        shown = picture[top:top + size:3, left:left + size:3]
        assert np.abs(shown.astype(int) - mnist.test_images[position, ..., 0].astype(int)).max() <= 1, label


def test_most_missed_takes_the_highest_misses_first():
    assert list(sources.most_missed(np.array([1.2, 3.0, 0.9, 3.0, 2.0]), 3)) == [1, 3, 4]


def test_least_real_takes_the_lowest_scores_first():
    realism = np.array([1.2, 0.3, 0.9, 0.3, 2.0])
    assert list(sources.least_real(realism, 3)) == [1, 3, 2]


def test_the_gate_figures_are_the_worse_judges():
    from quality import judge as judge_lib

    def row(judge, ratio, accuracy, precision, recall, worst_digit_ratio):
        return judge_lib.QualityReport("m", 100, 9.9, 1.0, ratio, accuracy, [accuracy] * 9 + [accuracy - 0.01],
                                       judge=judge, precision=precision, recall=recall,
                                       per_digit_frechet_ratio=[1.0] * 9 + [worst_digit_ratio])

    worst = sources.worst_figures([row("small", 2.2, 0.998, 0.91, 0.85, 3.0), row("wide", 2.6, 0.999, 0.83, 0.90, 2.5)])
    assert worst["frechet_ratio"] == (2.6, "wide") and worst["precision"] == (0.83, "wide")
    assert worst["recall"] == (0.85, "small") and worst["conditional_accuracy"] == (0.998, "small")
    assert worst["worst_digit_frechet_ratio"] == (3.0, "small")
    assert worst["worst_digit_accuracy"] == pytest.approx((0.988, "small"))
    line = sources.format_worst([row("small", 2.2, 0.998, 0.91, 0.85, 3.0), row("wide", 2.6, 0.999, 0.83, 0.90, 2.5)])
    assert "Fréchet ratio 2.60 (wide)" in line and "recall 0.850 (small)" in line


class _CountingSampler:
    """A conditional model stand-in that records what it was asked (draw_samples' side only)."""

    conditional, latent_dim = True, 3

    def __init__(self):
        self.asked = []

    def sample(self, digits, seeds):
        self.asked.append((digits.copy(), seeds.copy()))
        return np.zeros((len(digits), 28, 28, 1), np.float32)

    def default(self, noise):
        return np.zeros((len(noise), 28, 28, 1), np.float32)


def test_digits_are_asked_for_in_the_test_splits_shares_with_consecutive_seeds():
    test_labels = np.repeat(np.arange(10), [1, 2, 1, 1, 1, 1, 1, 1, 1, 10])  # 9s make half the split
    sampler = _CountingSampler()
    config = sources.EvaluateConfig(per_digit=4, default_samples=6, seed=7, batch_size=15)
    samples = sources.draw_samples(sampler, config, test_labels)
    assert np.bincount(samples.requested).tolist() == [2, 4, 2, 2, 2, 2, 2, 2, 2, 20]
    assert samples.seeds.tolist() == list(range(7, 47)) and samples.conditional.shape == (40, 28, 28, 1)
    assert [len(digits) for digits, _ in sampler.asked] == [15, 15, 10]  # in batches of batch_size
    assert np.concatenate([digits for digits, _ in sampler.asked]).tolist() == samples.requested.tolist()
    assert samples.default.shape == (6, 28, 28, 1)
