"""The MNIST judge and its figures behave on known inputs: real data is near perfect, noise is far,
a generator collapsed to one digit fails coverage. Uses the shipped classifier on real MNIST."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from quality import judge as judge_lib


@pytest.fixture(scope="module")
def mnist(mnist_data_dir):
    from mnist_data import acquire

    return acquire.load_mnist(mnist_data_dir)


@pytest.fixture(scope="module")
def judge_and_reference(mnist):
    judge = judge_lib.load_judge()  # the shipped judge
    return judge, judge_lib.reference(judge, mnist)


def test_the_shipped_judge_is_the_one_its_manifest_describes(judge_and_reference, mnist):
    judge, reference = judge_and_reference
    manifest = json.loads((judge_lib.SHIPPED_JUDGE / judge_lib.MANIFEST_FILE).read_text())
    assert judge_lib.file_sha256(judge_lib.SHIPPED_JUDGE / manifest["weights"]) == manifest["sha256"]
    probabilities = judge.read(judge_lib.real_images(mnist.test_images))[1]
    accuracy = float(np.mean(probabilities.argmax(axis=1) == mnist.test_labels))
    assert accuracy >= judge_lib.MIN_CLASSIFIER_ACCURACY
    assert accuracy == pytest.approx(manifest["test_accuracy"], abs=2e-4)  # at most 2 of 10,000 images differ
    calibration = manifest["calibration"]
    assert reference.calibration.mnist_score == pytest.approx(calibration["mnist_score"], abs=1e-3)
    assert reference.real_vs_real_frechet == pytest.approx(calibration["real_train_vs_real_test_frechet"], rel=1e-3)


def test_a_changed_or_missing_judge_is_refused_not_used(tmp_path):
    copy = tmp_path / "judge"
    shutil.copytree(judge_lib.SHIPPED_JUDGE, copy)
    weights = copy / judge_lib.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(judge_lib.EvaluationError, match="sha256"):
        judge_lib.load_judge(copy)
    with pytest.raises(judge_lib.EvaluationError, match="no MNIST judge in .*train-judge"):
        judge_lib.load_judge(tmp_path / "nowhere")


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


def test_format_reports_keeps_long_sources_whole_and_columns_aligned():
    reports = [judge_lib.QualityReport("real test split vs real train", 10000, 9.753, 2.209, 1.0, 0.9907, None,
                                       [0.089, 0.114]),
               judge_lib.QualityReport("previous_default after 646 s (step 7496)", 10000, 9.896, 4.179, 1.89, 0.998),
               judge_lib.QualityReport("tutorial after 600 s (step 1928)", 10000, 2.861, 481.242, 352.4)]
    lines = judge_lib.format_reports(reports).splitlines()
    assert lines[2].startswith("previous_default after 646 s (step 7496) ")
    assert len({line.index(" 10000 ") for line in lines[1:]}) == 1  # the samples column lines up
    assert lines[2].split()[-2:] == ["99.80%", "-"]  # no coverage measured
    assert lines[3].split()[-2:] == ["-", "-"]  # unconditional: no accuracy either
