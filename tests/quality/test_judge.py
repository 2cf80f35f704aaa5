"""The MNIST judge and its figures behave on known inputs: real data is near perfect, noise is far,
a generator collapsed to one digit fails coverage. Uses the real classifier on real MNIST."""
from __future__ import annotations

import numpy as np
import pytest

from quality import judge as judge_lib


@pytest.fixture(scope="module")
def mnist(mnist_data_dir):
    from trainer import data

    return data.load_mnist(mnist_data_dir)


@pytest.fixture(scope="module")
def judge_and_reference(mnist, mnist_data_dir):
    judge = judge_lib.load_or_train_classifier(mnist_data_dir, mnist)
    return judge, judge_lib.reference(judge, mnist)


def test_judge_reads_the_real_test_split(judge_and_reference):
    _, reference = judge_and_reference
    calibration = reference.calibration
    assert calibration.conditional_accuracy >= 0.99, calibration  # the judge's accuracy on real test data
    assert calibration.mnist_score > 9.0, calibration
    assert all(0.085 <= share <= 0.115 for share in calibration.coverage), calibration.coverage
    assert 0.0 < reference.real_vs_real_frechet < 10.0


def test_real_images_score_as_real_and_noise_far(judge_and_reference, mnist):
    judge, reference = judge_and_reference
    images = judge_lib.real_images(mnist.train_images[20_000:30_000])  # not among the reference's train images
    real = judge_lib.judge_images(judge, reference, "real", images, mnist.train_labels[20_000:30_000], images)
    assert real.conditional_accuracy >= 0.99 and real.frechet_ratio < 1.5 and real.mnist_score > 9.0, real
    noise = np.random.default_rng(0).uniform(0.0, 1.0, (2000, 28, 28, 1)).astype(np.float32)
    far = judge_lib.judge_images(judge, reference, "noise", None, None, noise)
    assert far.frechet_ratio > 50 and far.mnist_score < 2.0 and far.conditional_accuracy is None, far


def test_a_generator_collapsed_to_one_digit_fails_coverage(judge_and_reference, mnist):
    judge, reference = judge_and_reference
    threes = judge_lib.real_images(mnist.test_images[mnist.test_labels == 3])
    collapsed = judge_lib.judge_images(judge, reference, "only threes", None, None, threes)
    assert collapsed.coverage[3] > 0.95 and max(collapsed.coverage[:3] + collapsed.coverage[4:]) < 0.05
    assert collapsed.mnist_score < 1.5 and collapsed.frechet_ratio > 10, collapsed


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    first = rng.standard_normal((20_000, 4))
    assert judge_lib.frechet_distance(first, rng.standard_normal((20_000, 4))) < 0.01
    shifted = rng.standard_normal((20_000, 4)) + np.array([3.0, 0.0, 0.0, 0.0])
    assert judge_lib.frechet_distance(first, shifted) == pytest.approx(9.0, rel=0.02)  # |mean shift|^2
    scaled = 2.0 * rng.standard_normal((20_000, 4))
    assert judge_lib.frechet_distance(first, scaled) == pytest.approx(4.0, rel=0.05)  # 4 * (1 + 4 - 2*2)


def test_mnist_score_bounds():
    confident_and_varied = np.eye(10)[np.arange(1000) % 10]
    assert judge_lib.mnist_score(confident_and_varied) == pytest.approx(10.0, rel=1e-6)
    assert judge_lib.mnist_score(np.tile(np.eye(10)[3], (1000, 1))) == pytest.approx(1.0)
    assert judge_lib.mnist_score(np.full((1000, 10), 0.1)) == pytest.approx(1.0)


def test_bad_images_are_refused(judge_and_reference):
    judge, _ = judge_and_reference
    with pytest.raises(judge_lib.EvaluationError, match=r"shape \[N, 28, 28, 1\]"):
        judge.read(np.zeros((4, 28, 28), np.float32))
    with pytest.raises(judge_lib.EvaluationError, match="in \\[0, 1\\]"):
        judge.read(np.full((4, 28, 28, 1), 255.0, np.float32))
