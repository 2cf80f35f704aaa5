"""Feature-space measures beyond one Fréchet distance: improved precision and recall, the realism
score, and the kernel distance (KID). Plain numpy on feature arrays [N, D]; `judge.py` feeds them a
judge's penultimate features.

- Precision and recall (Kynkäänniemi et al., NeurIPS 2019): each sample of a set gets a ball that
  reaches its k-th nearest neighbour in the same set. Precision is the share of generated samples
  inside at least one real ball (catches blobs off the real digits' manifold); recall is the share
  of real samples inside at least one generated ball (catches styles never drawn).
- The miss of a real sample: min over generated samples g of ||f_real - f_g|| / r_g, its distance to
  the nearest generated ball in units of that ball's radius. At most 1 the sample is covered (what
  recall counts); the highest misses are the real styles the generator draws least.
- The realism score of a generated sample (the same paper): max over real samples j of
  r_j / ||f_g - f_j||, over the real balls no larger than the median (the largest half, outliers'
  balls, is left out, as the paper does). Under 1 the sample is outside every such ball; the lowest
  scores are the least real-looking samples.
- KID (Bińkowski et al., ICLR 2018): the unbiased estimate of MMD² with the kernel
  k(x, y) = (x·y / D + 1)³, averaged over random subsets. Unbiased at any sample size, unlike the
  Fréchet distance, so a 1,000-sample figure estimates the same quantity as a 10,000-sample one.

Distances are computed in float32, in row chunks (CHUNK rows against a whole set): two sets of
10,000 never need a 10,000 x 10,000 matrix at once.
"""
from __future__ import annotations

import dataclasses

import numpy as np

CHUNK = 1000  # rows per distance block: 1,000 x 10,000 float32 is 40 MB, a few such temporaries at most


def _as_float32(features: np.ndarray) -> np.ndarray:
    """Distances are computed in float32 (the judges' own precision): half the memory and time of float64."""
    return np.ascontiguousarray(features, np.float32)


def _squared_distances(rows: np.ndarray, columns: np.ndarray, column_norms: np.ndarray) -> np.ndarray:
    squared = (rows * rows).sum(axis=1)[:, None] + column_norms[None, :] - 2.0 * (rows @ columns.T)
    return np.maximum(squared, 0.0, out=squared)


def nearest_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """[N] distance from each sample to its k-th nearest other sample of `features` [N, D]."""
    features = _as_float32(features)
    if not 1 <= k < len(features):
        raise ValueError(f"k-th nearest neighbours need more than k = {k} samples, got {len(features)}")
    norms = (features * features).sum(axis=1)
    squared_radii = np.empty(len(features), np.float32)
    for start in range(0, len(features), CHUNK):
        block = _squared_distances(features[start:start + CHUNK], features, norms)
        # Index 0 of each sorted row is the sample itself (distance 0), so index k is its k-th neighbour.
        squared_radii[start:start + CHUNK] = np.partition(block, k, axis=1)[:, k]
    return np.sqrt(squared_radii.astype(np.float64))


@dataclasses.dataclass(frozen=True)
class Manifolds:
    """Precision and recall of a generated set against a real one, and per sample what they count."""

    precision: float
    recall: float
    realism: np.ndarray  # [M generated] float64
    inside_real: np.ndarray  # [M generated] bool: inside some real ball (what precision counts)
    covered: np.ndarray  # [N real] bool: inside some generated ball (what recall counts)
    miss: np.ndarray  # [N real] float64: distance to the nearest generated ball, in its radii (covered: <= 1)


def compare_manifolds(real: np.ndarray, generated: np.ndarray, k: int,
                      real_radii: np.ndarray | None = None) -> Manifolds:
    """Precision, recall, realism and misses of `generated` [M, D] against `real` [N, D] with k-NN balls.

    `real_radii` (from `nearest_neighbour_radii(real, k)`) may be passed when the real set is reused.
    """
    real, generated = _as_float32(real), _as_float32(generated)
    if real_radii is None:
        real_radii = nearest_neighbour_radii(real, k)
    squared_real_radii = (real_radii ** 2).astype(np.float32)
    squared_generated_radii = (nearest_neighbour_radii(generated, k) ** 2).astype(np.float32)
    # The realism score's balls: the half with the smaller radii (the others weigh 0 in the max).
    realism_weights = np.where(real_radii <= np.median(real_radii), squared_real_radii, 0.0).astype(np.float32)
    real_norms = (real * real).sum(axis=1)
    inside_real = np.zeros(len(generated), bool)
    covered = np.zeros(len(real), bool)
    squared_miss = np.full(len(real), np.inf, np.float32)
    squared_realism = np.empty(len(generated), np.float32)
    for start in range(0, len(generated), CHUNK):
        squared = _squared_distances(generated[start:start + CHUNK], real, real_norms)
        inside_real[start:start + CHUNK] = (squared <= squared_real_radii[None, :]).any(axis=1)
        radii = squared_generated_radii[start:start + CHUNK, None]
        covered |= (squared <= radii).any(axis=0)
        np.minimum(squared_miss, (squared / np.maximum(radii, 1e-12)).min(axis=0), out=squared_miss)
        squared += 1e-12
        squared_realism[start:start + CHUNK] = (realism_weights[None, :] / squared).max(axis=1)
    return Manifolds(float(inside_real.mean()), float(covered.mean()), np.sqrt(squared_realism.astype(np.float64)),
                     inside_real, covered, np.sqrt(squared_miss.astype(np.float64)))


@dataclasses.dataclass(frozen=True)
class KernelDistance:
    """KID: the mean of the unbiased MMD² estimates over `subsets`, and their standard deviation."""

    mean: float
    spread: float
    subsets: int
    subset_size: int


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 10, subset_size: int = 1000,
                    seed: int = 0) -> KernelDistance:
    """KID between two feature sets [N, D] and [M, D]; see `KernelDistanceTo`."""
    return KernelDistanceTo(features_b, subsets, subset_size, seed)(features_a)


class KernelDistanceTo:
    """KID against a fixed (real) feature set [M, D], whose subsets and within-subset kernel sums are
    drawn and computed once, so that per-epoch figures pay only for the generated side.

    Each of `subsets` subsets draws min(subset_size, M) real samples and min(subset_size, N) generated
    ones without replacement (`seed` fixes which), and gives the unbiased MMD² of the two samples
    (sizes may differ): within-sample kernel means leave out the diagonal (a sample with itself).
    """

    def __init__(self, real: np.ndarray, subsets: int = 10, subset_size: int = 1000, seed: int = 0):
        self.real = _as_float32(real)
        self.size = min(subset_size, len(self.real))
        if self.size < 2 or subsets < 1:
            raise ValueError(f"KID needs at least 2 real samples and 1 subset, got {len(self.real)} and {subsets}")
        self.subset_size, self.seed = subset_size, seed
        rng = np.random.default_rng(seed)
        self.subsets = [self.real[rng.choice(len(self.real), self.size, replace=False)] for _ in range(subsets)]
        self.real_within = [_within_mean(_kernel(subset, subset)) for subset in self.subsets]

    def __call__(self, generated: np.ndarray) -> KernelDistance:
        generated = _as_float32(generated)
        size = min(self.subset_size, len(generated))
        if size < 2 or generated.shape[1] != self.real.shape[1]:
            raise ValueError(f"KID needs at least 2 generated samples of {self.real.shape[1]} features, "
                             f"got {list(generated.shape)}")
        rng = np.random.default_rng([self.seed, 1])
        whole = size == len(generated)  # every subset is then all of it: its within-sample mean is computed once
        generated_within = _within_mean(_kernel(generated, generated)) if whole else None
        estimates = []
        for real_subset, real_within in zip(self.subsets, self.real_within):
            sample = generated if whole else generated[rng.choice(len(generated), size, replace=False)]
            within = generated_within if whole else _within_mean(_kernel(sample, sample))
            estimates.append(within + real_within - 2.0 * float(_kernel(sample, real_subset).mean()))
        return KernelDistance(float(np.mean(estimates)), float(np.std(estimates)), len(self.subsets), size)


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The polynomial kernel (a·b / D + 1)³: products in float32, the cube (and later sums) in float64."""
    kernel = np.asarray(a @ b.T, np.float64)
    kernel /= a.shape[1]
    kernel += 1.0
    return kernel * kernel * kernel


def _within_mean(kernel: np.ndarray) -> float:
    """The mean of a within-sample kernel matrix without its diagonal: the unbiased estimate of E k(x, x')."""
    m = len(kernel)
    return float((kernel.sum() - np.trace(kernel)) / (m * (m - 1)))
