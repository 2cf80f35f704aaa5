"""Precision, recall, realism and KID on synthetic features whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from quality import judge as judge_lib, measures


def _clusters(centres: np.ndarray, per_cluster: int, rng, spread: float = 1.0) -> np.ndarray:
    return np.concatenate([centre + spread * rng.standard_normal((per_cluster, centres.shape[1])) for centre in centres])


def test_identical_sets_have_precision_and_recall_one():
    features = np.random.default_rng(0).standard_normal((600, 8))
    figures = measures.compare_manifolds(features, features.copy(), k=5)
    assert figures.precision == 1.0 and figures.recall == 1.0


def test_far_apart_sets_have_precision_and_recall_zero():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((500, 8))
    far = rng.standard_normal((500, 8)) + 100.0
    figures = measures.compare_manifolds(real, far, k=5)
    assert figures.precision == 0.0 and figures.recall == 0.0
    assert figures.realism.max() < 0.1  # every generated sample lies far outside every real ball


def test_a_generator_that_covers_half_the_modes_has_half_the_recall():
    rng = np.random.default_rng(2)
    centres = 50.0 * np.eye(10, 16)  # ten modes, far apart
    real = _clusters(centres, 200, rng)
    everything = measures.compare_manifolds(real, _clusters(centres, 200, rng), k=5)
    half = measures.compare_manifolds(real, _clusters(centres[:5], 400, rng), k=5)  # as many, from five modes
    # k-NN balls of a finite sample miss some real samples even of the same distribution (in 16
    # dimensions, about one in seven here), so half the modes give half of that recall.
    assert 0.8 < everything.recall < 1.0
    assert half.recall / everything.recall == pytest.approx(0.5, abs=0.03)
    assert half.precision == pytest.approx(everything.precision, abs=0.04)  # what it draws looks as real


def test_chunked_distances_match_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(3)
    real, generated = rng.standard_normal((300, 6)), rng.standard_normal((250, 6)) + 0.5
    monkeypatch.setattr(measures, "CHUNK", 37)  # blocks that do not divide either set
    figures = measures.compare_manifolds(real, generated, k=5)
    whole = np.linalg.norm(generated[:, None] - real[None], axis=2)  # [250, 300], fine at this size
    real_radii = np.sort(np.linalg.norm(real[:, None] - real[None], axis=2), axis=1)[:, 5]
    generated_radii = np.sort(np.linalg.norm(generated[:, None] - generated[None], axis=2), axis=1)[:, 5]
    np.testing.assert_allclose(measures.nearest_neighbour_radii(real, 5), real_radii, rtol=1e-4)
    assert figures.precision == pytest.approx(np.mean((whole <= real_radii[None]).any(axis=1)), abs=1 / 250)
    assert figures.recall == pytest.approx(np.mean((whole <= generated_radii[:, None]).any(axis=0)), abs=1 / 300)
    kept = real_radii <= np.median(real_radii)
    np.testing.assert_allclose(figures.realism, (real_radii[kept][None] / whole[:, kept]).max(axis=1), rtol=1e-3)
    np.testing.assert_allclose(figures.miss, (whole / generated_radii[:, None]).min(axis=0), rtol=1e-3)
    assert figures.recall == figures.covered.mean() and figures.precision == figures.inside_real.mean()


def test_the_highest_misses_are_the_real_mode_never_drawn():
    rng = np.random.default_rng(6)
    centres = 50.0 * np.eye(4, 8)
    real = _clusters(centres, 100, rng)
    figures = measures.compare_manifolds(real, _clusters(centres[:3], 150, rng), k=5)  # mode 3 never drawn
    assert set(np.argsort(-figures.miss)[:100] // 100) == {3}
    assert figures.miss[300:].min() > 10.0 and not figures.covered[300:].any()
    assert (figures.miss[figures.covered] <= 1.0).all() and (figures.miss[~figures.covered] > 1.0).all()


def test_realism_orders_samples_by_distance_from_the_real_ones():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((1000, 4))
    probes = np.stack([real[0], real[0] + 0.5, np.full(4, 3.0), np.full(4, 30.0)])
    realism = measures.compare_manifolds(real, np.concatenate([probes, rng.standard_normal((100, 4))]), k=5).realism[:4]
    assert realism[0] > 1.0 and realism[-1] < 0.1
    assert list(np.argsort(-realism)) == [0, 1, 2, 3]


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((4000, 16))
    same = measures.kernel_distance(rng.standard_normal((1000, 16)), real)
    shifted = measures.kernel_distance(rng.standard_normal((1000, 16)) + 0.5, real)
    assert abs(same.mean) < 3 * same.spread + 1e-3
    assert shifted.mean > 0.05 and shifted.mean > 20 * abs(same.mean)


def test_kid_is_unbiased_where_the_frechet_distance_is_not():
    """Small samples: the mean of many KID estimates lands on the large-sample value (0 for one
    distribution), while the Fréchet distance of small samples of one distribution is well above 0."""
    rng = np.random.default_rng(6)
    estimates = [measures.kernel_distance(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)), subsets=1).mean
                 for _ in range(300)]
    standard_error = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates)) < 3 * standard_error
    small_sample_frechet = np.mean([judge_lib.frechet_distance(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)))
                                    for _ in range(30)])
    assert small_sample_frechet > 1.0  # the bias KID avoids
    # The same shift measured at two sample sizes: KID agrees, within the estimates' noise.
    small = [measures.kernel_distance(rng.standard_normal((100, 8)) + 0.3, rng.standard_normal((100, 8)), subsets=1).mean
             for _ in range(100)]
    large = measures.kernel_distance(rng.standard_normal((3000, 8)) + 0.3, rng.standard_normal((3000, 8)),
                                     subsets=1, subset_size=3000).mean
    assert np.mean(small) == pytest.approx(large, abs=4 * np.std(small) / np.sqrt(len(small)))


def test_kid_against_a_fixed_reference_reuses_its_subsets():
    rng = np.random.default_rng(7)
    reference = measures.KernelDistanceTo(rng.standard_normal((2000, 8)), subsets=5, subset_size=500)
    generated = rng.standard_normal((500, 8)) + 0.2
    assert reference(generated) == reference(generated)  # same subsets, same figure
    assert reference(generated).subset_size == 500 and reference(generated).subsets == 5
    with pytest.raises(ValueError, match="at least 2 generated samples of 8 features"):
        reference(rng.standard_normal((500, 3)))
