"""The MNIST judges and their figures behave on known inputs: real data is near perfect, noise is far,
a generator collapsed to one digit fails coverage. Uses the shipped classifiers on real MNIST."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from common import cpu_kernels, files
from quality import judge as judge_lib, sources


@pytest.fixture(scope="module")
def mnist(mnist_data_dir):
    from mnist_data import acquire

    return acquire.load_mnist(mnist_data_dir)


# `reference()` through the file kept beside MNIST (computed by whichever test got there first):
# test_recalibrate_rewrites_only_the_calibration computes the first judge's afresh and compares.
@pytest.fixture(scope="module")
def judge_and_reference(mnist, mnist_data_dir):
    judge = judge_lib.load_judge()  # the first shipped judge
    return judge, sources.stored_reference(judge, mnist, mnist_data_dir)


@pytest.fixture(scope="module")
def second_judge_and_reference(mnist, mnist_data_dir):
    judge = judge_lib.load_judge(judge_lib.SECOND_JUDGE)
    return judge, sources.stored_reference(judge, mnist, mnist_data_dir)


BOTH_JUDGES = ["judge_and_reference", pytest.param("second_judge_and_reference", marks=pytest.mark.slow)]


@pytest.mark.parametrize("which", BOTH_JUDGES)
def test_each_shipped_judge_is_the_one_its_manifest_describes(which, request, mnist):
    judge, reference = request.getfixturevalue(which)
    folder = judge_lib.SHIPPED_JUDGES[0 if which == "judge_and_reference" else 1]
    manifest = json.loads((folder / judge_lib.MANIFEST_FILE).read_text())
    assert judge_lib.file_sha256(folder / manifest["weights"]) == manifest["sha256"]
    assert judge.name == manifest.get("architecture", "small") == ("small" if folder == judge_lib.SHIPPED_JUDGE else "wide")
    assert (folder / manifest["weights"]).stat().st_size < 2_000_000
    probabilities = judge.read(judge_lib.real_images(mnist.test_images))[1]
    accuracy = float(np.mean(probabilities.argmax(axis=1) == mnist.test_labels))
    assert accuracy >= judge_lib.MIN_CLASSIFIER_ACCURACY
    assert accuracy == pytest.approx(manifest["test_accuracy"], abs=2e-4)  # at most 2 of 10,000 images differ
    calibration = manifest["calibration"]
    assert reference.calibration.mnist_score == pytest.approx(calibration["mnist_score"], abs=1e-3)
    assert reference.real_vs_real_frechet == pytest.approx(calibration["real_train_vs_real_test_frechet"], rel=1e-3)
    assert reference.calibration.precision == pytest.approx(calibration["precision"], abs=2e-3)
    assert reference.calibration.recall == pytest.approx(calibration["recall"], abs=2e-3)
    assert (calibration["reference_draws"], calibration["reference_train_images"]) == (
        judge_lib.REFERENCE_DRAWS, judge_lib.REFERENCE_SIZE)


def test_the_two_shipped_judges_differ_in_design():
    small, wide = judge_lib.load_judges()
    assert (small.name, wide.name) == ("small", "wide")
    assert small.model.get_layer("features").units == 128 and wide.model.get_layer("features").units == 256
    assert small.manifest["sha256"] != wide.manifest["sha256"]


@pytest.mark.parametrize("folder", judge_lib.SHIPPED_JUDGES, ids=["small", "wide"])
def test_a_changed_or_missing_judge_is_refused_not_used(tmp_path, folder):
    copy = tmp_path / "judge"
    shutil.copytree(folder, copy)
    weights = copy / judge_lib.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(judge_lib.EvaluationError, match="sha256"):
        judge_lib.load_judge(copy)
    with pytest.raises(judge_lib.EvaluationError, match="no MNIST judge in .*train-judge"):
        judge_lib.load_judge(tmp_path / "nowhere")


@pytest.mark.parametrize("which", BOTH_JUDGES)
def test_judge_reads_the_real_test_split(which, request):
    _, reference = request.getfixturevalue(which)
    calibration = reference.calibration
    assert calibration.conditional_accuracy >= 0.99, calibration  # the judge's accuracy on real test data
    assert calibration.mnist_score > 9.0, calibration
    assert all(0.085 <= share <= 0.115 for share in calibration.coverage), calibration.coverage
    assert 0.0 < reference.real_vs_real_frechet < 10.0
    assert 0.85 < calibration.precision < 1.0 and 0.85 < calibration.recall < 1.0, calibration
    assert calibration.frechet_ratio == pytest.approx(1.0) and calibration.per_digit_frechet_ratio == pytest.approx([1.0] * 10)


def test_the_reference_draws_are_disjoint_random_draws_in_the_test_splits_shares(mnist):
    draws = judge_lib.reference_draws(mnist.train_labels, mnist.test_labels)
    assert len(draws) == judge_lib.REFERENCE_DRAWS and all(len(draw) == judge_lib.REFERENCE_SIZE for draw in draws)
    assert len(np.unique(np.concatenate(draws))) == judge_lib.REFERENCE_DRAWS * judge_lib.REFERENCE_SIZE
    shares = np.bincount(judge_lib.digits_in_proportion(mnist.test_labels, judge_lib.REFERENCE_SIZE))
    assert all(np.array_equal(np.bincount(mnist.train_labels[draw], minlength=10), shares) for draw in draws)
    assert not np.array_equal(np.sort(draws[0]), np.arange(judge_lib.REFERENCE_SIZE))  # not the first images
    again = judge_lib.reference_draws(mnist.train_labels, mnist.test_labels)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))  # the same draws on every machine
    small = judge_lib.reference_draws(mnist.train_labels[:150], mnist.test_labels)  # too few for a full draw
    assert len(small) == 1 and len(set(small[0])) == len(small[0]) and set(small[0]) <= set(range(150))


@pytest.mark.slow
def test_the_reference_draws_judged_as_a_model_average_to_the_calibration(judge_and_reference, mnist):
    """The model path (`judge_images`) on each of the calibration's real train draws: their Fréchet ratios
    (all digits and each digit) average to 1 and their precision and recall to the calibration's. The
    split's first images, which the calibration once used, read further from the test split than any draw."""
    judge, reference = judge_and_reference
    rows = []
    for draw in judge_lib.reference_draws(mnist.train_labels, mnist.test_labels):
        images = judge_lib.real_images(mnist.train_images[draw])
        rows.append(judge_lib.judge_images(judge, reference, "real train", images, mnist.train_labels[draw], images))
    assert np.mean([row.frechet_ratio for row in rows]) == pytest.approx(1.0, abs=1e-9)
    assert np.mean([row.per_digit_frechet_ratio for row in rows], axis=0) == pytest.approx([1.0] * 10, abs=1e-9)
    assert np.mean([row.precision for row in rows]) == pytest.approx(reference.calibration.precision, abs=1e-9)
    assert np.mean([row.recall for row in rows]) == pytest.approx(reference.calibration.recall, abs=1e-9)
    first = judge_lib.real_images(mnist.train_images[:judge_lib.REFERENCE_SIZE])
    in_order = judge_lib.judge_images(judge, reference, "first train images", first,
                                      mnist.train_labels[:judge_lib.REFERENCE_SIZE], first)
    assert in_order.frechet_ratio > max(row.frechet_ratio for row in rows), (in_order, rows)


def _assert_same_reference(stored, computed):
    for name in ("test_features", "test_labels", "test_radii"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(computed, name))
    for stored_moments, computed_moments in zip([stored.test_moments, *stored.per_digit_test_moments],
                                                [computed.test_moments, *computed.per_digit_test_moments]):
        for name in ("mean", "covariance", "root"):
            np.testing.assert_array_equal(getattr(stored_moments, name), getattr(computed_moments, name))
    assert (stored.real_vs_real_frechet, stored.per_digit_real_vs_real, stored.calibration) == (
        computed.real_vs_real_frechet, computed.per_digit_real_vs_real, computed.calibration)


def test_a_stored_reference_is_read_back_by_the_next_process(tmp_path, judge_and_reference, mnist, monkeypatch):
    judge, reference = judge_and_reference
    computed = []
    monkeypatch.setattr(judge_lib, "reference", lambda *args: computed.append(args) or reference)
    first = sources.stored_reference(judge, mnist, str(tmp_path))  # computes (here: the fixture's) and keeps it
    stored = sources.reference_path(judge, mnist, str(tmp_path))
    folder, prefix = stored.parent, stored.name.split("-")[0]
    assert folder == tmp_path / sources.REFERENCE_FOLDER and prefix == judge.manifest["sha256"][:16]
    assert len(computed) == 1 and stored.is_file() and first is reference
    again = sources.stored_reference(judge, mnist, str(tmp_path))  # as a new process would: read, not computed
    assert len(computed) == 1
    _assert_same_reference(again, reference)
    stored.write_bytes(b"not an npz")  # a damaged file is refused, computed again and replaced
    with pytest.raises(ValueError, match="not a stored reference"):
        judge_lib.load_reference(stored)
    outdated, other_judge = folder / f"{prefix}-{'0' * 64}.npz", folder / f"{'f' * 16}-{'0' * 64}.npz"
    outdated.write_bytes(b"an earlier fingerprint"), other_judge.write_bytes(b"another judge's")
    sources.stored_reference(judge, mnist, str(tmp_path))
    assert len(computed) == 2
    _assert_same_reference(judge_lib.load_reference(stored), reference)
    # The judge's outdated file is removed, another judge's kept, and no temporary file is left.
    assert sorted(path.name for path in folder.iterdir()) == sorted([stored.name, other_judge.name, f"{prefix}.lock"])


def test_a_process_that_finds_the_reference_being_computed_waits_and_reads_it(tmp_path, judge_and_reference, mnist,
                                                                              monkeypatch):
    """Two processes sharing a data dir: the second waits for the first's computation (here: the test holds
    the lock and writes the file), then reads the file instead of judging the real digits again."""
    judge, reference = judge_and_reference
    computed, result = [], {}
    monkeypatch.setattr(judge_lib, "reference", lambda *args: computed.append(args) or reference)
    stored = sources.reference_path(judge, mnist, str(tmp_path))
    lock_path = stored.parent / f"{stored.name.split('-')[0]}.lock"
    waiting = threading.Event()
    real_lock = files.exclusive_lock
    monkeypatch.setattr(files, "exclusive_lock",
                        lambda path, on_wait: real_lock(path, on_wait=lambda: (on_wait(), waiting.set())))

    def second_process():
        result["read"] = sources.stored_reference(judge, mnist, str(tmp_path))

    with real_lock(lock_path):
        thread = threading.Thread(target=second_process)
        thread.start()
        assert waiting.wait(timeout=60), "stored_reference did not wait for the lock"
        judge_lib.save_reference(reference, stored)  # the first process's work
    thread.join(timeout=60)
    assert computed == []
    _assert_same_reference(result["read"], reference)


def test_the_reference_fingerprint_changes_with_the_weights_the_data_and_the_kernels(judge_and_reference, mnist,
                                                                                    monkeypatch):
    judge, _ = judge_and_reference
    fingerprint = judge_lib.reference_fingerprint(judge, mnist)
    assert fingerprint == judge_lib.reference_fingerprint(judge, mnist)
    assert fingerprint != judge_lib.reference_fingerprint(judge_lib.load_judge(judge_lib.SECOND_JUDGE), mnist)
    labels = mnist.test_labels.copy()
    labels[0] = (labels[0] + 1) % 10
    assert fingerprint != judge_lib.reference_fingerprint(judge, mnist._replace(test_labels=labels))
    # Features computed with the other CPU kernels differ in their last bits: never read them.
    other = cpu_kernels.ONEDNN if cpu_kernels.in_use() != cpu_kernels.ONEDNN else cpu_kernels.EIGEN
    monkeypatch.setattr(cpu_kernels, "in_use", lambda: other)
    assert fingerprint != judge_lib.reference_fingerprint(judge, mnist)


@pytest.mark.slow
def test_recalibrate_rewrites_only_the_calibration(tmp_path, judge_and_reference, mnist_data_dir):
    from typer.testing import CliRunner

    import cli

    _, reference = judge_and_reference
    copy = tmp_path / "judge"
    shutil.copytree(judge_lib.SHIPPED_JUDGE, copy)
    manifest_path = copy / judge_lib.MANIFEST_FILE
    before = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(before, calibration={"real_train_vs_real_test_frechet": 99.0})))
    result = CliRunner().invoke(cli.app, ["train-judge", "--out", str(copy), "--recalibrate", "--data-dir", mnist_data_dir])
    assert result.exit_code == 0, result.output
    after = json.loads(manifest_path.read_text())
    assert {key: value for key, value in after.items() if key != "calibration"} == \
        {key: value for key, value in before.items() if key != "calibration"}
    # Computed afresh here, so this also checks the fixture's stored real side against the computation.
    calibration = after["calibration"]
    assert calibration["real_train_vs_real_test_frechet"] == pytest.approx(reference.real_vs_real_frechet, rel=1e-4)
    assert calibration["mnist_score"] == pytest.approx(reference.calibration.mnist_score, rel=1e-4)
    assert calibration["precision"] == pytest.approx(reference.calibration.precision, abs=2e-3)
    assert calibration["recall"] == pytest.approx(reference.calibration.recall, abs=2e-3)
    assert calibration["command"].endswith("--recalibrate")
    assert judge_lib.load_judge(copy).manifest["sha256"] == before["sha256"]


def test_recalibrate_refuses_a_folder_without_a_judge(tmp_path):
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, ["train-judge", "--out", str(tmp_path / "nothing"), "--recalibrate"])
    assert result.exit_code == 2 and "no MNIST judge in" in result.output, result.output


@pytest.mark.slow  # judges 10,000 real digits and more: seconds on a slow CPU
def test_real_images_score_as_real_and_noise_far(judge_and_reference, mnist):
    judge, reference = judge_and_reference
    images = judge_lib.real_images(mnist.train_images[20_000:30_000])  # 10,000 real digits, not a random draw
    real = judge_lib.judge_images(judge, reference, "real", images, mnist.train_labels[20_000:30_000], images)
    assert real.conditional_accuracy >= 0.99 and real.frechet_ratio < 1.5 and real.mnist_score > 9.0, real
    assert real.precision > 0.9 and real.recall > 0.9 and max(real.per_digit_frechet_ratio) < 2.0, real
    assert min(real.per_digit_precision) > 0.8 and min(real.per_digit_recall) > 0.8, real
    noise = np.random.default_rng(0).uniform(0.0, 1.0, (2000, 28, 28, 1)).astype(np.float32)
    far = judge_lib.judge_images(judge, reference, "noise", None, None, noise)
    assert far.frechet_ratio > 50 and far.mnist_score < 2.0 and far.conditional_accuracy is None, far
    # Noise collapses to a few points of feature space, far from most real digits: no real style is
    # drawn (recall 0), though some noise lands in the wide balls of real outliers (precision's known weakness).
    assert far.recall < 0.01 and far.precision < 0.5 and far.per_digit_frechet_ratio is None, far
    assert far.per_digit_precision is None and max(far.per_digit_recall) < 0.05, far


def test_a_generator_collapsed_to_one_digit_fails_coverage(judge_and_reference, mnist):
    judge, reference = judge_and_reference
    threes = judge_lib.real_images(mnist.test_images[mnist.test_labels == 3])
    collapsed = judge_lib.judge_images(judge, reference, "only threes", None, None, threes)
    assert collapsed.coverage[3] > 0.95 and max(collapsed.coverage[:3] + collapsed.coverage[4:]) < 0.05
    assert collapsed.mnist_score < 1.5 and collapsed.frechet_ratio > 10, collapsed
    assert collapsed.recall < 0.2 < 0.9 < collapsed.precision, collapsed  # real-looking threes, most styles missing


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


def test_format_reports_prints_a_table_per_judge_with_columns_aligned():
    def row(source, judge, ratio, accuracy=None, **figures):
        return judge_lib.QualityReport(source, 10000, 9.8, 4.0, ratio, accuracy, judge=judge, **figures)

    digits = dict(per_digit_accuracy=[0.999] * 8 + [0.985, 0.998], per_digit_frechet_ratio=[1.5] * 7 + [2.75, 1.5, 1.5],
                  precision=0.912, recall=0.874, coverage=[0.089, 0.114],
                  per_digit_precision=[0.93] + [0.738] + [0.92] * 8, per_digit_recall=[0.86] * 8 + [0.793, 0.842])
    reports = [row("real test split vs real train", "small", 1.0, 0.9907, **digits),
               row("previous_default after 646 s (step 7496)", "small", 1.89, 0.998, **digits),
               row("tutorial after 600 s (step 1928)", "small", 352.4),
               row("previous_default after 646 s (step 7496)", "wide", 2.04, 0.997, **digits)]
    text = judge_lib.format_reports(reports)
    small, wide = text.split("\n\n")
    small_lines, wide_lines = small.splitlines(), wide.splitlines()
    assert small_lines[0] == "judge small:" and wide_lines[0] == "judge wide:" and len(wide_lines) == 3
    assert small_lines[3].startswith("previous_default after 646 s (step 7496) ")
    assert len({line.index(" 10000 ") for line in small_lines[2:]}) == 1  # the samples column lines up
    assert small_lines[3].split()[-12:] == ["1.89", "1.62", "2.75", "(7)", "0.912", "0.738(1)", "0.874", "0.793(8)",
                                            "99.80%", "98.50%", "(8)", "8.9%-11.4%"]
    assert small_lines[4].split()[-10:] == ["352.40"] + ["-"] * 9  # unconditional, no more measured
    assert wide_lines[2].split()[8] == "2.04"
    assert max(len(line) for line in text.splitlines()) <= 140  # with sources up to 40 characters


def test_a_report_round_trips_through_its_dict():
    report = judge_lib.QualityReport("x", 100, 9.0, 3.0, 1.5, 0.99, [0.99] * 10, [0.1] * 10, judge="wide",
                                     precision=0.9, recall=0.8, per_digit_frechet_ratio=[1.0] * 9 + [3.0],
                                     per_digit_precision=[0.9] * 9 + [0.7], per_digit_recall=[0.6] + [0.8] * 9)
    figures = report.to_dict()
    assert figures["worst_frechet_digit"] == 9 and figures["mean_digit_frechet_ratio"] == pytest.approx(1.2)
    assert figures["worst_precision_digit"] == 9 and figures["worst_recall_digit"] == 0
    assert judge_lib.QualityReport.from_dict(figures) == report


def test_a_manifest_without_an_architecture_is_the_small_judge(tmp_path):
    assert "architecture" not in json.loads((judge_lib.SHIPPED_JUDGE / judge_lib.MANIFEST_FILE).read_text())
    assert judge_lib.read_manifest(judge_lib.SHIPPED_JUDGE)["architecture"] == "small"
    copy = tmp_path / "mine"
    shutil.copytree(judge_lib.SHIPPED_JUDGE, copy)
    manifest = json.loads((copy / judge_lib.MANIFEST_FILE).read_text())
    assert judge_lib.load_judge(copy).name == "mine"  # a judge of one's own is named by its folder
    (copy / judge_lib.MANIFEST_FILE).write_text(json.dumps(dict(manifest, architecture="huge")))
    with pytest.raises(judge_lib.EvaluationError, match="architecture 'huge'"):
        judge_lib.load_judge(copy)


def test_digits_in_proportion_keeps_the_shares_of_the_labels(mnist):
    digits = judge_lib.digits_in_proportion(np.array([0, 0, 0, 1, 7, 7, 7, 7]), 16)
    assert digits.dtype == np.int32 and digits.tolist() == [0] * 6 + [1] * 2 + [7] * 8
    thirds = judge_lib.digits_in_proportion(np.array([2, 5, 9]), 10)  # 3.33 each: the remainder goes to the first
    assert np.bincount(thirds, minlength=10).tolist() == [0, 0, 4, 0, 0, 3, 0, 0, 0, 3]
    test_split = judge_lib.digits_in_proportion(mnist.test_labels, 10_000)
    assert np.bincount(test_split).tolist() == np.bincount(mnist.test_labels).tolist()
    assert len(judge_lib.digits_in_proportion(mnist.test_labels, 1000)) == 1000
    for labels, total in ((np.array([], np.int64), 10), (np.array([1, 2]), -1)):
        with pytest.raises(ValueError, match="total"):
            judge_lib.digits_in_proportion(labels, total)


@pytest.mark.slow  # judges 10,000 real digits and more: seconds on a slow CPU
def test_real_digits_in_equal_shares_read_further_from_the_test_split(judge_and_reference, mnist):
    # Why evaluate asks for digits in the test split's shares: the class mix alone moves the distance.
    judge, reference = judge_and_reference
    pool_labels = np.asarray(mnist.train_labels[20_000:])  # not among the reference's train images
    rng = np.random.default_rng(0)

    def ratio(counts):
        chosen = np.concatenate([rng.choice(np.flatnonzero(pool_labels == digit), count, replace=False)
                                 for digit, count in enumerate(counts)])
        features, _ = judge.read(judge_lib.real_images(mnist.train_images[20_000:][chosen]))
        return judge_lib.frechet_between(judge_lib.moments(features), reference.test_moments) / reference.real_vs_real_frechet

    in_test_shares = ratio(np.bincount(judge_lib.digits_in_proportion(mnist.test_labels, 10_000)))
    in_equal_shares = ratio([1000] * 10)
    assert in_equal_shares > 1.1 * in_test_shares, (in_equal_shares, in_test_shares)
