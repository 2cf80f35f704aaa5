"""Measured quality: the project's own MNIST classifiers as judges, and the figures they give.

Two judges ship with the project, each trained once on real MNIST (>= 99% on the test split) with
its own seed, in `quality/judge_weights/` ("small": two convolutions, 128 features; recipes are
chosen by it) and `quality/second_judge_weights/` ("wide": four convolutions, global average
pooling, 256 features; never tuned on, it confirms). Each folder holds the weights and a
`manifest.json` with the command that trained it, its architecture, its accuracy, its calibration
figures and the weights' sha256, as TF-GAN ships its MNIST classifier: every machine judges with the
same weights, so figures compare across machines and runs. A figure moves when the ruler changes,
so every figure is given under both judges and gates take the worse. Nothing in training may use
a judge (they only report). A judge's penultimate layer (`features`) is its feature space. Images
enter every function here as float32 [N, 28, 28, 1] in [0, 1] (0 = background, 1 = ink), which is
what the served signatures return.

Figures (all computed by `judge_samples`, per judge):
- MNIST score = exp(E_x KL(p(y|x) || p(y))): up to 10; high when each image is confidently one
  digit and all digits occur. Real test data scores near 10.
- Fréchet distance between the features of the samples and of the real test split (lower is
  better), and its ratio to the real-train-vs-real-test distance (1.0 = as close as real data;
  the mean over random draws of real train digits, `reference_draws`).
- Per-digit Fréchet ratio (conditional models): digit d's samples against real test d, over real
  train d against real test d; its mean and its worst digit.
- Precision and recall (k = 5 nearest neighbours, `measures.py`): the share of samples on the real
  test digits' manifold, and the share of real test digits on the samples' manifold.
- Conditional accuracy: the share of samples the judge reads as the digit that was requested, and
  the worst digit's.
- Coverage: the share of samples read as each digit (10% each when no digit is missing or favoured).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common import files, precision
from quality import measures

log = logging.getLogger(__name__)

NUM_CLASSES = 10
CLASSIFIER_VERSION = 1  # bump when the architecture or recipe changes: manifests of another version are refused
SHIPPED_JUDGE = Path(__file__).resolve().parent / "judge_weights"  # the first judge: recipes are chosen by it
SECOND_JUDGE = Path(__file__).resolve().parent / "second_judge_weights"  # another design, never tuned on: it confirms
SHIPPED_JUDGES = (SHIPPED_JUDGE, SECOND_JUDGE)  # every figure is given under both, and gated on the worse
ARCHITECTURES = ("small", "wide")  # a manifest without "architecture" is "small" (the first judge's)
DEFAULT_SEEDS = {"small": 0, "wide": 1}  # the seeds the shipped judges were trained with
WEIGHTS_FILE = "mnist_judge.weights.h5"
MANIFEST_FILE = "manifest.json"
MIN_CLASSIFIER_ACCURACY = 0.99
REFERENCE_SIZE = 10_000  # real train images in each draw compared with the real test split: a model's sample size
REFERENCE_DRAWS = 5  # disjoint draws from the shuffled train split (MNIST's ones allow five), averaged
REFERENCE_SEED = 0  # seeds that shuffle, so every machine draws the same real digits
NEAREST_NEIGHBOURS = 5  # k of precision and recall: a sample's ball reaches its k-th nearest neighbour


class EvaluationError(ValueError):
    """The evaluation cannot be done as asked; the message says why and what to do."""


def build_classifier(seed: int = 0, architecture: str = "small"):
    """A judge CNN: float32 [B, 28, 28, 1] in [0, 1] → logits [B, 10]; penultimate layer `features`.

    "small": two 3x3 convolutions (32, 64; BatchNorm, ReLU, max-pooling), flattened, 128 features.
    "wide": two blocks of two 3x3 convolutions (32 then 64 channels, BatchNorm, ReLU; max-pooling
    after each block), global average pooling, 256 features: a different design, so the two judges'
    feature spaces differ. Always float32, whatever mixed-precision policy a training run has set
    globally, so its figures are the same from every caller; `seed` seeds its initial weights and dropout.
    """
    import keras

    builders = {"small": _small_layers, "wide": _wide_layers}
    if architecture not in builders:
        raise EvaluationError(f"unknown judge architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    with precision.float32_policy():
        return builders[architecture](keras, seed)


def _small_layers(keras, seed: int):
    layers = keras.layers
    inputs = keras.Input((28, 28, 1), name="images")
    hidden = inputs
    initializer = lambda offset: keras.initializers.GlorotUniform(seed=seed + offset)  # noqa: E731
    for index, filters in enumerate((32, 64)):
        hidden = layers.Conv2D(filters, 3, use_bias=False, kernel_initializer=initializer(index))(hidden)
        hidden = layers.MaxPooling2D()(layers.ReLU()(layers.BatchNormalization()(hidden)))
    hidden = layers.Dropout(0.3, seed=seed + 10)(layers.Flatten()(hidden))
    features = layers.Dense(128, activation="relu", name="features", kernel_initializer=initializer(2))(hidden)
    logits = layers.Dense(NUM_CLASSES, name="logits", kernel_initializer=initializer(3))(
        layers.Dropout(0.3, seed=seed + 11)(features))
    return keras.Model(inputs, logits, name="mnist_judge")


def _wide_layers(keras, seed: int):
    layers = keras.layers
    inputs = keras.Input((28, 28, 1), name="images")
    hidden = inputs
    initializer = lambda offset: keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731
    for index, filters in enumerate((32, 32, 64, 64)):
        hidden = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=initializer(index))(hidden)
        hidden = layers.ReLU()(layers.BatchNormalization()(hidden))
        if index % 2:
            hidden = layers.MaxPooling2D()(hidden)
    hidden = layers.GlobalAveragePooling2D()(hidden)
    features = layers.Dense(256, activation="relu", name="features", kernel_initializer=initializer(4))(hidden)
    logits = layers.Dense(NUM_CLASSES, name="logits", kernel_initializer=initializer(5))(
        layers.Dropout(0.3, seed=seed + 11)(features))
    return keras.Model(inputs, logits, name="mnist_judge_wide")


def real_images(uint8_images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28, 1] in 0..255 → float32 [N, 28, 28, 1] in [0, 1], the judge's input range."""
    return uint8_images.astype(np.float32) / 255.0


def train_classifier(mnist, epochs: int = 5, seed: int = 0, report: Callable[[str], None] = log.info,
                     architecture: str = "small"):
    """Trains a judge on the real train split; returns (model, accuracy on the real test split)."""
    import keras

    model = build_classifier(seed, architecture)
    steps = epochs * (len(mnist.train_images) // 128 + 1)
    learning_rate = keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(real_images(mnist.train_images), mnist.train_labels, batch_size=128, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(real_images(mnist.test_images), mnist.test_labels, batch_size=500, verbose=0)
    report(f"MNIST judge ({architecture}) trained: {accuracy:.2%} on the real test split")
    return model, float(accuracy)


def load_judge(directory: str | Path | None = None) -> "Judge":
    """The judge in `directory` (weights + manifest); None is the first shipped judge.

    The weights' sha256 must match the manifest's, so a changed or partial file is refused, never
    used: figures from the shipped judges compare across machines and runs only if they are the same judges.
    """
    directory = Path(directory) if directory is not None else SHIPPED_JUDGE
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]
    digest = file_sha256(weights)
    if digest != manifest["sha256"]:
        raise EvaluationError(f"the judge weights {weights} have sha256 {digest}, but its manifest says "
                              f"{manifest['sha256']}: restore them (git checkout) or train a judge with "
                              "`python cli.py train-judge --out DIR`")
    model = build_classifier(architecture=manifest["architecture"])
    model.load_weights(str(weights))
    shipped = any(directory.resolve() == folder for folder in SHIPPED_JUDGES)
    return Judge(model, manifest, name=manifest["architecture"] if shipped else directory.resolve().name)


def load_judges(directories: Sequence[str | Path] = ()) -> list["Judge"]:
    """The judges in `directories`, in that order; none given: both shipped judges (first, second)."""
    return [load_judge(directory) for directory in (directories or SHIPPED_JUDGES)]


def read_manifest(directory: Path) -> dict:
    """The manifest of the judge in `directory`; EvaluationError when there is none or it is not one."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"no MNIST judge in {directory} (no {MANIFEST_FILE}); train one with "
                              "`python cli.py train-judge --out DIR`") from None
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path} is not valid JSON: {error}") from None
    missing = [key for key in ("weights", "sha256", "classifier_version") if key not in manifest]
    if missing:
        raise EvaluationError(f"{path} is not a judge manifest (missing {', '.join(missing)})")
    if manifest["classifier_version"] != CLASSIFIER_VERSION:
        raise EvaluationError(f"the judge in {directory} is version {manifest['classifier_version']}; this code "
                              f"builds version {CLASSIFIER_VERSION}: train one with `python cli.py train-judge --out DIR`")
    manifest = dict(manifest, architecture=manifest.get("architecture", "small"))
    if manifest["architecture"] not in ARCHITECTURES:
        raise EvaluationError(f"the judge in {directory} has architecture {manifest['architecture']!r}; this code "
                              f"builds {', '.join(ARCHITECTURES)}")
    return manifest


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise EvaluationError(f"the judge weights {path} are missing") from None


def train_judge(mnist, directory: str | Path, command: str, report: Callable[[str], None] = log.info,
                architecture: str = "small", seed: int = 0) -> dict:
    """Trains a judge on real MNIST and writes it to `directory` (weights, then the manifest); returns the manifest.

    Refuses (EvaluationError) a judge under MIN_CLASSIFIER_ACCURACY on the real test split. The
    manifest records the command, the architecture and seed, the accuracy, the calibration figures
    and the weights' sha256.
    """
    import keras
    import tensorflow as tf

    model, accuracy = train_classifier(mnist, seed=seed, report=report, architecture=architecture)
    if accuracy < MIN_CLASSIFIER_ACCURACY:
        raise EvaluationError(f"the MNIST judge reached only {accuracy:.2%} on the test split "
                              f"(needs {MIN_CLASSIFIER_ACCURACY:.0%}); not writing it")
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    bare = build_classifier(architecture=architecture)  # the weights alone, without the optimizer's state
    bare.set_weights(model.get_weights())
    _save_weights_atomic(bare, weights)
    manifest = {
        "weights": WEIGHTS_FILE, "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
        "classifier_version": CLASSIFIER_VERSION, "architecture": architecture, "seed": seed, "command": command,
        "test_accuracy": accuracy,
        "calibration": calibration_figures(Judge(model, {}, name=architecture), mnist),
        "trained_with": {"tensorflow": tf.__version__, "keras": keras.__version__,
                         "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)"},
    }
    files.write_json_atomic(directory / MANIFEST_FILE, manifest)
    return manifest


def recalibrate(directory: str | Path, mnist, command: str) -> dict:
    """Recomputes the calibration figures in the manifest of the judge in `directory`, keeping its weights
    (after a change to how the figures are computed); records `command`; returns the new manifest."""
    judge = load_judge(directory)
    stored = json.loads((Path(directory) / MANIFEST_FILE).read_text())  # as written, without read_manifest's defaults
    manifest = dict(stored, calibration=dict(calibration_figures(judge, mnist), command=command))
    files.write_json_atomic(Path(directory) / MANIFEST_FILE, manifest)
    return manifest


def calibration_figures(judge: "Judge", mnist) -> dict:
    """The calibration row's figures as a manifest records them (the real-vs-real distance divides the
    per-epoch Fréchet ratios, `quality/epochs.py`)."""
    calibration = reference(judge, mnist).calibration
    return {"mnist_score": calibration.mnist_score, "real_train_vs_real_test_frechet": calibration.frechet_distance,
            "reference_train_images": REFERENCE_SIZE, "reference_draws": REFERENCE_DRAWS,
            "reference_seed": REFERENCE_SEED, "coverage": calibration.coverage, "precision": calibration.precision,
            "recall": calibration.recall, "nearest_neighbours": NEAREST_NEIGHBOURS}


def _save_weights_atomic(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".weights.h5", dir=path.parent)
    os.close(handle)
    try:
        model.save_weights(temporary, overwrite=True)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class Judge:
    """The classifier as a function: images → (penultimate features, class probabilities).

    `manifest` is what its manifest says of it (empty for a judge that was just trained); `name`
    is what reports call it ("small" and "wide" for the shipped judges, else its folder's name).
    """

    def __init__(self, model, manifest: dict, name: str):
        import keras
        import tensorflow as tf

        self.model = model
        self.manifest = manifest
        self.name = name
        features_and_logits = keras.Model(model.inputs, [model.get_layer("features").output, model.output])
        # One compiled graph for every batch rather than eager calls: quicker, with the same numbers.
        self._features_and_logits = tf.function(lambda images: features_and_logits(images, training=False),
                                                input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])

    def read(self, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """images float32 [N, 28, 28, 1] in [0, 1] → (features float64 [N, D], probabilities float64 [N, 10])."""
        _check_images(images)
        features, logits = [], []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], np.float32)
            batch_features, batch_logits = self._features_and_logits(batch)
            features.append(np.asarray(batch_features, np.float64))
            logits.append(np.asarray(batch_logits, np.float64))
        return np.concatenate(features), _softmax(np.concatenate(logits))


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1) or len(images) == 0:
        raise EvaluationError(f"expected images of shape [N, 28, 28, 1] with N > 0, got {list(images.shape)}")
    if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
        raise EvaluationError("expected finite image values in [0, 1]")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def mnist_score(probabilities: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) for probabilities [N, 10]; between 1 and 10."""
    marginal = probabilities.mean(axis=0, keepdims=True)
    eps = 1e-12  # log(0) guard; a zero probability contributes 0 to the KL sum either way
    kl = (probabilities * (np.log(probabilities + eps) - np.log(marginal + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets [N, D]."""
    return frechet_between(moments(features_a), moments(features_b))


@dataclasses.dataclass(frozen=True)
class Moments:
    """A feature set's mean, covariance and the covariance's square root: what a Fréchet distance
    needs of it, computed once for a set that is compared again and again (the real test digits)."""

    mean: np.ndarray
    covariance: np.ndarray
    root: np.ndarray  # the symmetric PSD square root of `covariance`


def moments(features: np.ndarray) -> Moments:
    covariance = np.cov(features, rowvar=False)
    return Moments(features.mean(axis=0), covariance, _psd_sqrt(covariance))


def frechet_between(a: Moments, b: Moments) -> float:
    """The Fréchet distance between two feature sets' moments."""
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_b^(1/2) S_a S_b^(1/2)), a symmetric PSD matrix,
    # so plain symmetric eigendecompositions suffice (no scipy.linalg.sqrtm).
    middle = np.linalg.eigvalsh(b.root @ a.covariance @ b.root)
    trace_of_root = np.sqrt(np.clip(middle, 0.0, None)).sum()
    distance = (np.sum((a.mean - b.mean) ** 2) + np.trace(a.covariance) + np.trace(b.covariance)
                - 2.0 * trace_of_root)
    return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def digits_in_proportion(labels: np.ndarray, total: int) -> np.ndarray:
    """int32 [total], sorted: digits 0..9 in the shares they have among `labels` (largest remainders).

    A generated set is compared with the real test split like with like only when it holds each
    digit in the test split's share: asked for equal shares, the class mix alone would add to every
    Fréchet distance what no generator can remove (docs/experiments.md measures it on real digits).
    """
    counts = np.bincount(np.asarray(labels), minlength=NUM_CLASSES)[:NUM_CLASSES]
    if total < 0 or counts.sum() == 0:
        raise ValueError(f"need labels and a total >= 0, got {counts.sum()} labels and total {total!r}")
    exact = counts / counts.sum() * total
    whole = np.floor(exact).astype(np.int64)
    largest_remainders = np.argsort(-(exact - whole), kind="stable")[:total - int(whole.sum())]
    whole[largest_remainders] += 1
    return np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), whole)


def coverage(probabilities: np.ndarray) -> list[float]:
    """The share of images read as each digit 0..9 (argmax of the judge)."""
    counts = np.bincount(probabilities.argmax(axis=1), minlength=NUM_CLASSES)
    return (counts / counts.sum()).tolist()


def conditional_accuracy(probabilities: np.ndarray, requested: np.ndarray) -> tuple[float, list[float]]:
    """(overall, per digit 0..9) share of images read as the digit that was requested."""
    correct = probabilities.argmax(axis=1) == requested
    per_digit = [float(correct[requested == digit].mean()) if np.any(requested == digit) else float("nan")
                 for digit in range(NUM_CLASSES)]
    return float(correct.mean()), per_digit


@dataclasses.dataclass(frozen=True)
class Reference:
    """The real-data side of every comparison under one judge: the test split's features, labels and
    k-NN radii, the real-vs-real Fréchet distances (all digits, and per digit), and the calibration row."""

    test_features: np.ndarray
    test_labels: np.ndarray
    test_moments: Moments
    per_digit_test_moments: list[Moments]  # of digit d's test features
    test_radii: np.ndarray  # k-NN radii of the test features (k = NEAREST_NEIGHBOURS)
    real_vs_real_frechet: float  # real train vs real test: the mean over the draws of REFERENCE_SIZE images
    per_digit_real_vs_real: list[float]  # the same, digit d of train against digit d of test
    calibration: "QualityReport"


CALIBRATION_SOURCE = "real test split vs real train"


def reference_draws(train_labels: np.ndarray, test_labels: np.ndarray) -> list[np.ndarray]:
    """Indices of up to REFERENCE_DRAWS disjoint random draws of REFERENCE_SIZE train images, each holding
    every digit in its share of the test split, as a model's sample does (`digits_in_proportion`).

    Random, not the split's first images: MNIST comes in its original order, whose first 10,000
    train digits sit further from the test split than random draws do (docs/quality.md). A split too
    small for one such draw gives one draw of what it has, up to each digit's share.
    """
    train_labels = np.asarray(train_labels)
    shares = np.bincount(digits_in_proportion(test_labels, min(REFERENCE_SIZE, len(train_labels))),
                         minlength=NUM_CLASSES)
    rng = np.random.default_rng(REFERENCE_SEED)
    pools = [rng.permutation(np.flatnonzero(train_labels == digit)) for digit in range(NUM_CLASSES)]
    count = min([REFERENCE_DRAWS] + [len(pool) // share for pool, share in zip(pools, shares) if share])
    return [np.concatenate([pool[draw * share:(draw + 1) * share] for pool, share in zip(pools, shares)])
            for draw in range(max(count, 1))]


def reference(judge: Judge, mnist) -> Reference:
    """Reads the real test split and REFERENCE_DRAWS draws of REFERENCE_SIZE real train images with the judge.

    The real-vs-real distances (the ratios' denominators) are the mean over the draws: one draw's
    distance moves by a tenth or more from draw to draw. The calibration row gives the test split's
    MNIST score, accuracy and coverage, and real train against real test, averaged over the draws,
    for the Fréchet ratio (1.0), the per-digit ratios (1.0 each), precision and recall (the best a
    model can expect: real digits against real digits).
    """
    test_features, test_probabilities = judge.read(real_images(mnist.test_images))
    test_labels = np.asarray(mnist.test_labels)
    test_moments = moments(test_features)
    per_digit_moments = [moments(test_features[test_labels == digit]) for digit in range(NUM_CLASSES)]
    all_train_labels, all_train_images = np.asarray(mnist.train_labels), np.asarray(mnist.train_images)
    draws = reference_draws(all_train_labels, test_labels)
    train_labels = [all_train_labels[draw] for draw in draws]
    train_features = [judge.read(real_images(all_train_images[draw]))[0] for draw in draws]
    distances = [frechet_between(moments(features), test_moments) for features in train_features]
    per_digit = [[frechet_between(moments(features[labels == digit]), per_digit_moments[digit])
                  for digit in range(NUM_CLASSES)] for features, labels in zip(train_features, train_labels)]
    radii = measures.nearest_neighbour_radii(test_features, NEAREST_NEIGHBOURS)
    partial = Reference(test_features, test_labels, test_moments, per_digit_moments, radii, float(np.mean(distances)),
                        [float(distance) for distance in np.mean(per_digit, axis=0)], calibration=None)
    accuracy, per_digit_accuracy = conditional_accuracy(test_probabilities, test_labels)
    judged = [_judge_features(judge.name, partial, CALIBRATION_SOURCE, features, None, labels).report
              for features, labels in zip(train_features, train_labels)]
    calibration = dataclasses.replace(
        _mean_report(judged), samples=len(test_features), mnist_score=mnist_score(test_probabilities),
        conditional_accuracy=accuracy, per_digit_accuracy=per_digit_accuracy, coverage=coverage(test_probabilities))
    return dataclasses.replace(partial, calibration=calibration)


def reference_fingerprint(judge: Judge, mnist) -> str:
    """A sha256 of everything that decides `reference(judge, mnist)`: the judge's weights, MNIST's
    arrays, the source of this module and of `measures`, the TensorFlow, Keras and NumPy versions and
    the CPU kernels, whose rounding differs in the last bits (so a change to how the real side is
    computed never reads a file written before it)."""
    import keras
    import tensorflow as tf

    from common import cpu_kernels

    versions = f"{tf.__version__} {keras.__version__} {np.__version__} {cpu_kernels.in_use()}"
    digest = hashlib.sha256(f"{judge.manifest['sha256']} {versions}".encode())
    for array in (mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    for module_file in (Path(__file__), Path(measures.__file__)):
        digest.update(module_file.read_bytes())
    return digest.hexdigest()


def save_reference(reference_data: Reference, path: str | Path) -> Path:
    """Writes `reference_data` to `path` as one .npz file, atomically; `load_reference` reads it back."""
    digit_moments = reference_data.per_digit_test_moments
    arrays = dict(
        test_features=reference_data.test_features, test_labels=reference_data.test_labels,
        test_radii=reference_data.test_radii, test_mean=reference_data.test_moments.mean,
        test_covariance=reference_data.test_moments.covariance, test_root=reference_data.test_moments.root,
        digit_means=np.stack([one.mean for one in digit_moments]),
        digit_covariances=np.stack([one.covariance for one in digit_moments]),
        digit_roots=np.stack([one.root for one in digit_moments]),
        real_vs_real_frechet=np.float64(reference_data.real_vs_real_frechet),
        per_digit_real_vs_real=np.asarray(reference_data.per_digit_real_vs_real, np.float64),
        calibration=np.array(json.dumps(reference_data.calibration.to_dict())))
    return files.write_npz_atomic(path, **arrays)


def load_reference(path: str | Path) -> Reference:
    """The Reference `save_reference` wrote to `path`; OSError or ValueError when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        width = arrays["test_features"].shape[1]
        digit_shapes = (arrays["digit_means"].shape, arrays["digit_covariances"].shape, arrays["digit_roots"].shape)
        if digit_shapes != ((NUM_CLASSES, width), (NUM_CLASSES, width, width), (NUM_CLASSES, width, width)):
            raise ValueError(f"per-digit moments of shapes {digit_shapes} for {width} features")
        digit_moments = [Moments(mean, covariance, root) for mean, covariance, root in
                         zip(arrays["digit_means"], arrays["digit_covariances"], arrays["digit_roots"])]
        return Reference(
            arrays["test_features"], arrays["test_labels"],
            Moments(arrays["test_mean"], arrays["test_covariance"], arrays["test_root"]), digit_moments,
            arrays["test_radii"], float(arrays["real_vs_real_frechet"]),
            [float(value) for value in arrays["per_digit_real_vs_real"]],
            QualityReport.from_dict(dict(json.loads(str(arrays["calibration"])))))
    except (KeyError, IndexError, TypeError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"'{path}' is not a stored reference: {error}") from None  # JSONDecodeError is a ValueError


def _mean_report(reports: list["QualityReport"]) -> "QualityReport":
    """The real draws' rows as one: the mean of each Fréchet figure, of precision and of recall (all digits and per digit)."""
    def average(name: str) -> float:
        return float(np.mean([getattr(report, name) for report in reports]))

    def average_per_digit(name: str) -> list[float]:
        return [float(value) for value in np.mean([getattr(report, name) for report in reports], axis=0)]

    return dataclasses.replace(
        reports[0], frechet_distance=average("frechet_distance"), frechet_ratio=average("frechet_ratio"),
        precision=average("precision"), recall=average("recall"),
        per_digit_frechet_ratio=average_per_digit("per_digit_frechet_ratio"),
        per_digit_precision=average_per_digit("per_digit_precision"),
        per_digit_recall=average_per_digit("per_digit_recall"))


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """One row of figures under one judge; `None` where a figure does not apply (e.g. accuracy of an
    unconditional model) or was not computed."""

    source: str
    samples: int
    mnist_score: float
    frechet_distance: float
    frechet_ratio: float  # frechet_distance / real-vs-real distance
    conditional_accuracy: float | None = None
    per_digit_accuracy: list[float] | None = None
    coverage: list[float] | None = None  # under serving_default (noise only)
    judge: str | None = None  # the judge's name ("small", "wide" for the shipped ones)
    precision: float | None = None  # k = NEAREST_NEIGHBOURS, against the real test split
    recall: float | None = None
    per_digit_frechet_ratio: list[float] | None = None  # digit d generated vs real test d, over real train d vs test d
    per_digit_precision: list[float] | None = None  # precision of the images asked to be digit d
    per_digit_recall: list[float] | None = None  # the share of real test digits d that some generated ball covers

    @property
    def mean_digit_frechet_ratio(self) -> float | None:
        """The mean of the per-digit Fréchet ratios (over the digits that were asked for)."""
        known = _known(self.per_digit_frechet_ratio)
        return None if not known else float(np.mean(list(known.values())))

    @property
    def worst_frechet_digit(self) -> int | None:
        """The digit with the highest per-digit Fréchet ratio."""
        return _extreme_digit(self.per_digit_frechet_ratio, max)

    @property
    def worst_accuracy_digit(self) -> int | None:
        """The digit read as asked least often."""
        return _extreme_digit(self.per_digit_accuracy, min)

    @property
    def worst_precision_digit(self) -> int | None:
        """The digit whose images lie off the real digits' manifold most often."""
        return _extreme_digit(self.per_digit_precision, min)

    @property
    def worst_recall_digit(self) -> int | None:
        """The digit whose real styles the generator misses most often."""
        return _extreme_digit(self.per_digit_recall, min)

    def to_dict(self) -> dict:
        """The fields, and the figures derived from them (mean and worst digit), for JSON readers."""
        derived = {"mean_digit_frechet_ratio": self.mean_digit_frechet_ratio,
                   "worst_frechet_digit": self.worst_frechet_digit, "worst_accuracy_digit": self.worst_accuracy_digit,
                   "worst_precision_digit": self.worst_precision_digit, "worst_recall_digit": self.worst_recall_digit}
        return dict(dataclasses.asdict(self), **derived)

    @classmethod
    def from_dict(cls, figures: dict) -> "QualityReport":
        """The inverse of `to_dict` (derived figures are recomputed, other extra keys ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in figures.items() if name in names})


def _known(per_digit: list[float] | None) -> dict[int, float]:
    """{digit: value} of a per-digit list, without the NaNs of digits that were not asked for."""
    return {digit: value for digit, value in enumerate(per_digit or []) if not np.isnan(value)}


def _extreme_digit(per_digit: list[float] | None, pick) -> int | None:
    """The digit whose known value `pick` (min or max) chooses; None when no digit has one."""
    known = _known(per_digit)
    return None if not known else pick(known, key=known.get)


@dataclasses.dataclass(frozen=True)
class Judged:
    """A report, the realism score of each judged image, and the miss of each real test image
    (`measures.Manifolds.miss`: above 1, no generated image is near it)."""

    report: QualityReport
    realism: np.ndarray
    miss: np.ndarray


def judge_images(judge: Judge, reference_data: Reference, source: str, conditional_images: np.ndarray | None,
                 requested_digits: np.ndarray | None, default_images: np.ndarray) -> QualityReport:
    """Figures for a model; see `judge_samples`."""
    return judge_samples(judge, reference_data, source, conditional_images, requested_digits, default_images).report


def judge_samples(judge: Judge, reference_data: Reference, source: str, conditional_images: np.ndarray | None,
                  requested_digits: np.ndarray | None, default_images: np.ndarray) -> Judged:
    """Figures for a model: `conditional_images` [N, 28, 28, 1] were asked to be `requested_digits` [N]
    (None for unconditional models); `default_images` come from noise alone (serving_default).

    The score, the Fréchet distance, precision and recall (and each image's realism) use the
    conditional images when there are any (what a client asking for digits gets), otherwise the
    default ones; the per-digit Fréchet ratios need conditional images. Coverage uses the default ones.
    """
    default_features, default_probabilities = judge.read(default_images)
    features, probabilities, requested = default_features, default_probabilities, None
    if conditional_images is not None:
        features, probabilities = judge.read(conditional_images)
        requested = np.asarray(requested_digits)
    judged = _judge_features(judge.name, reference_data, source, features, probabilities, requested)
    return dataclasses.replace(judged, report=dataclasses.replace(judged.report, coverage=coverage(default_probabilities)))


def _judge_features(name: str, reference_data: Reference, source: str, features: np.ndarray,
                    probabilities: np.ndarray | None, requested: np.ndarray | None) -> Judged:
    """The figures of `features` (the MNIST score and accuracy only with `probabilities`, the
    per-digit figures only with `requested` digits); coverage is the caller's."""
    distance = frechet_between(moments(features), reference_data.test_moments)
    accuracy = per_digit_accuracy = per_digit_ratio = None
    if requested is not None:
        per_digit_ratio = per_digit_frechet_ratios(features, requested, reference_data)
        if probabilities is not None:
            accuracy, per_digit_accuracy = conditional_accuracy(probabilities, requested)
    manifolds = measures.compare_manifolds(reference_data.test_features, features, NEAREST_NEIGHBOURS,
                                           real_radii=reference_data.test_radii)
    score = mnist_score(probabilities) if probabilities is not None else float("nan")
    per_digit_precision = None if requested is None else per_digit_means(manifolds.inside_real, requested)
    report = QualityReport(
        source=source, samples=len(features), mnist_score=score, frechet_distance=distance,
        frechet_ratio=distance / reference_data.real_vs_real_frechet, conditional_accuracy=accuracy,
        per_digit_accuracy=per_digit_accuracy, judge=name, precision=manifolds.precision, recall=manifolds.recall,
        per_digit_frechet_ratio=per_digit_ratio, per_digit_precision=per_digit_precision,
        per_digit_recall=per_digit_means(manifolds.covered, reference_data.test_labels))
    return Judged(report, manifolds.realism, manifolds.miss)


def per_digit_means(values: np.ndarray, digits: np.ndarray) -> list[float]:
    """For each digit d, the mean of `values` [N] over the rows whose digit is d (NaN where there are none)."""
    return [float(np.mean(values[digits == digit])) if np.any(digits == digit) else float("nan")
            for digit in range(NUM_CLASSES)]


def per_digit_frechet_ratios(features: np.ndarray, requested: np.ndarray, reference_data: Reference) -> list[float]:
    """For each digit d: Fréchet distance(images asked to be d, real test d) / (real train d, real test d);
    NaN for a digit with fewer than 2 images."""
    ratios = []
    for digit in range(NUM_CLASSES):
        mine = features[requested == digit]
        if len(mine) < 2:
            ratios.append(float("nan"))
            continue
        distance = frechet_between(moments(mine), reference_data.per_digit_test_moments[digit])
        ratios.append(distance / reference_data.per_digit_real_vs_real[digit])
    return ratios


def format_reports(reports: list[QualityReport]) -> str:
    """Fixed-width tables, one per judge (in the order the reports name them), one row per report (the
    calibration rows included by the caller); the source column is as wide as the longest source,
    so no name is cut. Columns: samples, MNIST score, Fréchet ratio, per-digit Fréchet ratio (mean
    over the digits, then the worst with its digit), precision and recall (each over all digits, then
    the worst digit's with its digit), conditional accuracy (all digits, then the worst with its
    digit), coverage (the least and most frequent digit's share)."""
    width = max([30] + [len(report.source) for report in reports])
    header = (f"{'source':<{width}} {'samples':>7} {'MNIST':>5} {'ratio':>6} {'digits':>6} {'worst':>8} {'prec.':>5} "
              f"{'worst':>8} {'rec.':>5} {'worst':>8} {'acc.':>7} {'worst':>10} {'coverage':>10}")
    judges = list(dict.fromkeys(report.judge for report in reports))
    tables = []
    for name in judges:
        rows = [f"judge {name}:"] if name is not None else []
        rows.append(header)
        rows += [_format_row(report, width) for report in reports if report.judge == name]
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


def _format_row(report: QualityReport, width: int) -> str:
    def share(value):
        return "-" if value is None else f"{value:.3f}"

    accuracy = "-" if report.conditional_accuracy is None else f"{report.conditional_accuracy:.2%}"
    worst_accuracy = ("-" if report.worst_accuracy_digit is None else
                      f"{report.per_digit_accuracy[report.worst_accuracy_digit]:.2%} ({report.worst_accuracy_digit})")
    mean_digit = "-" if report.mean_digit_frechet_ratio is None else f"{report.mean_digit_frechet_ratio:.2f}"
    worst_digit = ("-" if report.worst_frechet_digit is None else
                   f"{report.per_digit_frechet_ratio[report.worst_frechet_digit]:.2f} ({report.worst_frechet_digit})")
    spread = "-" if not report.coverage else f"{min(report.coverage):.1%}-{max(report.coverage):.1%}"
    worst_precision = _worst_share(report.per_digit_precision, report.worst_precision_digit)
    worst_recall = _worst_share(report.per_digit_recall, report.worst_recall_digit)
    return (f"{report.source:<{width}} {report.samples:>7} {report.mnist_score:>5.3f} {report.frechet_ratio:>6.2f} "
            f"{mean_digit:>6} {worst_digit:>8} {share(report.precision):>5} {worst_precision:>8} "
            f"{share(report.recall):>5} {worst_recall:>8} {accuracy:>7} {worst_accuracy:>10} {spread:>10}")


def _worst_share(per_digit: list[float] | None, digit: int | None) -> str:
    return "-" if digit is None else f"{per_digit[digit]:.3f}({digit})"


def reports_json(reports: list[QualityReport]) -> str:
    return json.dumps([report.to_dict() for report in reports], indent=2)
