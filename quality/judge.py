"""Measured quality: the project's own MNIST classifier as judge, and the figures it gives.

The judge is a small CNN trained once on real MNIST (>= 99% on the test split) and shipped with the
project in `quality/judge_weights/` (weights + `manifest.json` with the command that trained it,
its accuracy, its calibration figures and the weights' sha256), as TF-GAN ships its MNIST
classifier: every machine judges with the same weights, so figures compare across machines and
runs. Nothing in training may use it (it only reports). Its penultimate layer (`features`, 128 ReLU units) is the
feature space for the Fréchet distance. Images enter every function here as float32
[N, 28, 28, 1] in [0, 1] (0 = background, 1 = ink), which is what the served signatures return.

Figures (all computed by `judge_images`):
- MNIST score = exp(E_x KL(p(y|x) || p(y))): up to 10; high when each image is confidently one
  digit and all digits occur. Real test data scores near 10.
- Fréchet distance between the features of the samples and of the real test split (lower is
  better), and its ratio to the real-train-vs-real-test distance (1.0 = as close as real data).
- Conditional accuracy: the share of samples the judge reads as the digit that was requested.
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
from pathlib import Path
from typing import Callable

import numpy as np

from common import files, precision

log = logging.getLogger(__name__)

NUM_CLASSES = 10
CLASSIFIER_VERSION = 1  # bump when the architecture or recipe changes: manifests of another version are refused
SHIPPED_JUDGE = Path(__file__).resolve().parent / "judge_weights"  # the judge every figure uses by default
WEIGHTS_FILE = "mnist_judge.weights.h5"
MANIFEST_FILE = "manifest.json"
MIN_CLASSIFIER_ACCURACY = 0.99
REFERENCE_SIZE = 10_000  # real train images compared with the real test split in the calibration row


class EvaluationError(ValueError):
    """The evaluation cannot be done as asked; the message says why and what to do."""


def build_classifier(seed: int = 0):
    """The judge CNN: float32 [B, 28, 28, 1] in [0, 1] → logits [B, 10]; penultimate layer `features` [B, 128].

    Always float32, whatever mixed-precision policy a training run has set globally, so its figures
    are the same from every caller; `seed` seeds its initial weights and dropout.
    """
    import keras

    with precision.float32_policy():
        return _classifier_layers(keras, seed)


def _classifier_layers(keras, seed: int):
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


def real_images(uint8_images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28, 1] in 0..255 → float32 [N, 28, 28, 1] in [0, 1], the judge's input range."""
    return uint8_images.astype(np.float32) / 255.0


def train_classifier(mnist, epochs: int = 5, seed: int = 0, report: Callable[[str], None] = log.info):
    """Trains the judge on the real train split; returns (model, accuracy on the real test split)."""
    import keras

    model = build_classifier(seed)
    steps = epochs * (len(mnist.train_images) // 128 + 1)
    learning_rate = keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(real_images(mnist.train_images), mnist.train_labels, batch_size=128, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(real_images(mnist.test_images), mnist.test_labels, batch_size=500, verbose=0)
    report(f"MNIST judge trained: {accuracy:.2%} on the real test split")
    return model, float(accuracy)


def load_judge(directory: str | Path | None = None) -> "Judge":
    """The judge in `directory` (weights + manifest); None is the judge shipped with the project.

    The weights' sha256 must match the manifest's, so a changed or partial file is refused, never
    used: figures from the shipped judge compare across machines and runs only if it is the same judge.
    """
    directory = Path(directory) if directory is not None else SHIPPED_JUDGE
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]
    digest = file_sha256(weights)
    if digest != manifest["sha256"]:
        raise EvaluationError(f"the judge weights {weights} have sha256 {digest}, but its manifest says "
                              f"{manifest['sha256']}: restore them (git checkout) or train a judge with "
                              "`python cli.py train-judge --out DIR`")
    model = build_classifier()
    model.load_weights(str(weights))
    return Judge(model, manifest)


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
    return manifest


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise EvaluationError(f"the judge weights {path} are missing") from None


def train_judge(mnist, directory: str | Path, command: str, report: Callable[[str], None] = log.info) -> dict:
    """Trains a judge on real MNIST and writes it to `directory` (weights, then the manifest); returns the manifest.

    Refuses (EvaluationError) a judge under MIN_CLASSIFIER_ACCURACY on the real test split. The
    manifest records the command, the accuracy, the calibration figures and the weights' sha256.
    """
    import keras
    import tensorflow as tf

    model, accuracy = train_classifier(mnist, report=report)
    if accuracy < MIN_CLASSIFIER_ACCURACY:
        raise EvaluationError(f"the MNIST judge reached only {accuracy:.2%} on the test split "
                              f"(needs {MIN_CLASSIFIER_ACCURACY:.0%}); not writing it")
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    bare = build_classifier()  # the weights alone: the trained model would also save its optimizer's state
    bare.set_weights(model.get_weights())
    _save_weights_atomic(bare, weights)
    calibration = reference(Judge(model, {}), mnist).calibration
    manifest = {
        "weights": WEIGHTS_FILE, "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
        "classifier_version": CLASSIFIER_VERSION, "command": command,
        "test_accuracy": accuracy,
        "calibration": {"mnist_score": calibration.mnist_score,
                        "real_train_vs_real_test_frechet": calibration.frechet_distance,
                        "reference_train_images": REFERENCE_SIZE, "coverage": calibration.coverage},
        "trained_with": {"tensorflow": tf.__version__, "keras": keras.__version__,
                         "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)"},
    }
    files.write_json_atomic(directory / MANIFEST_FILE, manifest)
    return manifest


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

    `manifest` is what its manifest says of it (empty for a judge that was just trained).
    """

    def __init__(self, model, manifest: dict):
        import keras

        self.model = model
        self.manifest = manifest
        self._features_and_logits = keras.Model(model.inputs, [model.get_layer("features").output, model.output])

    def read(self, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """images float32 [N, 28, 28, 1] in [0, 1] → (features float64 [N, 128], probabilities float64 [N, 10])."""
        _check_images(images)
        features, logits = [], []
        for start in range(0, len(images), batch_size):
            batch_features, batch_logits = self._features_and_logits([images[start:start + batch_size]], training=False)
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
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    covariance_a, covariance_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix,
    # so plain symmetric eigendecompositions suffice (no scipy.linalg.sqrtm).
    root_a = _psd_sqrt(covariance_a)
    middle = np.linalg.eigvalsh(root_a @ covariance_b @ root_a)
    trace_of_root = np.sqrt(np.clip(middle, 0.0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(covariance_a) + np.trace(covariance_b) - 2.0 * trace_of_root
    return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


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
    """The real-data side of every comparison: the test split's features and the calibration row."""

    test_features: np.ndarray
    real_vs_real_frechet: float  # real train (REFERENCE_SIZE images) vs real test
    calibration: "QualityReport"


def reference(judge: Judge, mnist) -> Reference:
    """Reads the real test split and REFERENCE_SIZE real train images with the judge."""
    test_features, test_probabilities = judge.read(real_images(mnist.test_images))
    train_features, _ = judge.read(real_images(mnist.train_images[:REFERENCE_SIZE]))
    real_vs_real = frechet_distance(train_features, test_features)
    accuracy, per_digit = conditional_accuracy(test_probabilities, mnist.test_labels)
    calibration = QualityReport(
        source="real test split vs real train", samples=len(test_features),
        mnist_score=mnist_score(test_probabilities), frechet_distance=real_vs_real, frechet_ratio=1.0,
        conditional_accuracy=accuracy, per_digit_accuracy=per_digit, coverage=coverage(test_probabilities))
    return Reference(test_features, real_vs_real, calibration)


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """One row of figures; `None` where a figure does not apply (e.g. accuracy of an unconditional model)."""

    source: str
    samples: int
    mnist_score: float
    frechet_distance: float
    frechet_ratio: float  # frechet_distance / real-vs-real distance
    conditional_accuracy: float | None = None
    per_digit_accuracy: list[float] | None = None
    coverage: list[float] | None = None  # under serving_default (noise only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def judge_images(judge: Judge, reference_data: Reference, source: str, conditional_images: np.ndarray | None,
                 requested_digits: np.ndarray | None, default_images: np.ndarray) -> QualityReport:
    """Figures for a model: `conditional_images` [N, 28, 28, 1] were asked to be `requested_digits` [N]
    (None for unconditional models); `default_images` come from noise alone (serving_default).

    The score and the Fréchet distance use the conditional images when there are any (what a client
    asking for digits gets), otherwise the default ones.
    """
    default_features, default_probabilities = judge.read(default_images)
    features, probabilities = default_features, default_probabilities
    accuracy = per_digit = None
    if conditional_images is not None:
        features, probabilities = judge.read(conditional_images)
        accuracy, per_digit = conditional_accuracy(probabilities, np.asarray(requested_digits))
    distance = frechet_distance(features, reference_data.test_features)
    return QualityReport(source=source, samples=len(features), mnist_score=mnist_score(probabilities),
                         frechet_distance=distance, frechet_ratio=distance / reference_data.real_vs_real_frechet,
                         conditional_accuracy=accuracy, per_digit_accuracy=per_digit,
                         coverage=coverage(default_probabilities))


def format_reports(reports: list[QualityReport]) -> str:
    """A fixed-width table, one row per report (the calibration row included by the caller); the
    source column is as wide as the longest source, so no name is cut."""
    width = max([34] + [len(report.source) for report in reports])
    header = (f"{'source':<{width}} {'samples':>8} {'MNIST score':>11} {'Fréchet':>9} {'ratio':>6} {'cond. acc.':>10} "
              f"{'coverage':>13}")
    rows = [header]
    for report in reports:
        accuracy = "-" if report.conditional_accuracy is None else f"{report.conditional_accuracy:.2%}"
        spread = "-" if not report.coverage else f"{min(report.coverage):.1%}-{max(report.coverage):.1%}"
        rows.append(f"{report.source:<{width}} {report.samples:>8} {report.mnist_score:>11.3f} "
                    f"{report.frechet_distance:>9.3f} {report.frechet_ratio:>6.2f} {accuracy:>10} {spread:>13}")
    return "\n".join(rows)


def reports_json(reports: list[QualityReport]) -> str:
    return json.dumps([report.to_dict() for report in reports], indent=2)
