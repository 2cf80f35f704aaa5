"""Where judged images come from, and the evaluations `python cli.py evaluate` and the export gate run.

Every source is read through the public signatures, so what is judged is what a client receives:
- a bundle on disk (`evaluate_bundle`; the export gate judges its staged candidate this way);
- a run's checkpoint (`evaluate_run`): the generator is written with the same signatures to a
  temporary SavedModel and judged through it;
- a served model over gRPC (`evaluate_server`), with the standard TF Serving `Predict` calls.

Conditional models are asked for `per_digit` images of every digit through `sample` (seeds
seed + digit * per_digit + i); every model gives `default_samples` images through
`serving_default` from numpy normal noise (seed `seed`), which is where coverage is measured.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Callable, Protocol

import numpy as np

from quality import judge as judge_lib

NUM_CLASSES = judge_lib.NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """How many images to judge and how they are drawn.

    Attributes:
        per_digit: `sample` images per digit for conditional models (1,000 by default).
        default_samples: `serving_default` images (noise only) for coverage, and for the score and
            Fréchet distance of unconditional models.
        seed: first sample seed, and the seed of the numpy noise.
        batch_size: images per signature call (or per gRPC request).
        data_dir: TFDS data dir holding MNIST (None = TFDS default).
        judge_dir: a judge written by `python cli.py train-judge` (None = the one shipped with the project).
    """

    per_digit: int = 1000
    default_samples: int = 10_000
    seed: int = 0
    batch_size: int = 500
    data_dir: str | None = None
    judge_dir: str | None = None

    def __post_init__(self):
        for name in ("per_digit", "default_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer of at least 2, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")


class Sampler(Protocol):
    """A model as the signatures expose it; images come back float32 [N, 28, 28, 1] in [0, 1]."""

    conditional: bool
    latent_dim: int

    def sample(self, digits: np.ndarray, seeds: np.ndarray) -> np.ndarray: ...

    def default(self, noise: np.ndarray) -> np.ndarray: ...


def sample_inputs(conditional: bool, digits: np.ndarray, seeds: np.ndarray) -> dict[str, np.ndarray]:
    """The `sample` signature's inputs: seed int64 [N], and digit int32 [N] for conditional models."""
    inputs = {"seed": seeds.astype(np.int64)}
    if conditional:
        inputs["digit"] = digits.astype(np.int32)
    return inputs


class SignatureSampler:
    """A loaded SavedModel's `sample` and `serving_default` signatures."""

    def __init__(self, path: str):
        import tensorflow as tf

        self._signatures = tf.saved_model.load(path).signatures
        if "sample" not in self._signatures or "serving_default" not in self._signatures:
            raise judge_lib.EvaluationError(f"{path} lacks the 'sample' and 'serving_default' signatures of a digitgan bundle")
        self.conditional = "digit" in self._signatures["sample"].structured_input_signature[1]
        self.latent_dim = int(self._signatures["serving_default"].structured_input_signature[1]["noise"].shape[1])

    def sample(self, digits: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        return self._signatures["sample"](**sample_inputs(self.conditional, digits, seeds))["images"].numpy()

    def default(self, noise: np.ndarray) -> np.ndarray:
        return self._signatures["serving_default"](noise=noise)["images"].numpy()


class ServerSampler:
    """A served model, through the standard TF Serving `Predict` and `GetModelMetadata` calls."""

    def __init__(self, server: str, model_name: str, version: int | None = None, timeout: float = 120.0):
        from client import grpc_client

        self._client, self._where = grpc_client, dict(model_name=model_name, version=version, timeout=timeout)
        self._server = server
        signatures = grpc_client.get_metadata(server, model_name, version, timeout=timeout)["signatures"]
        if "sample" not in signatures or "serving_default" not in signatures:
            raise judge_lib.EvaluationError(f"model {model_name!r} on {server} lacks the 'sample' and 'serving_default' signatures")
        self.conditional = "digit" in signatures["sample"]["inputs"]
        self.latent_dim = grpc_client.read_latent_dim(server, model_name, version, timeout)
        self.version = None

    def sample(self, digits: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        return self._predict("sample", sample_inputs(self.conditional, digits, seeds))

    def default(self, noise: np.ndarray) -> np.ndarray:
        return self._predict("serving_default", {"noise": noise})

    def _predict(self, signature_name: str, inputs: dict) -> np.ndarray:
        images, version = self._client.predict(self._server, signature_name, inputs, **self._where)
        self.version = version
        return images.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Samples:
    """What a model gave: `conditional` [per_digit*10, 28, 28, 1] for `requested` digits, or None for an
    unconditional model; `default` [default_samples, 28, 28, 1] from noise."""

    conditional: np.ndarray | None
    requested: np.ndarray | None
    default: np.ndarray


def draw_samples(sampler: Sampler, config: EvaluateConfig, progress: Callable[[int], None] = lambda count: None) -> Samples:
    """Asks `sampler` for the images `config` describes, `config.batch_size` per call."""
    conditional = requested = None
    if sampler.conditional:
        requested = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), config.per_digit)
        seeds = config.seed + np.tile(np.arange(config.per_digit, dtype=np.int64), NUM_CLASSES) + requested * config.per_digit
        conditional = _in_batches(lambda start, stop: sampler.sample(requested[start:stop], seeds[start:stop]),
                                  len(requested), config.batch_size, progress)
    noise = np.random.default_rng(config.seed).standard_normal((config.default_samples, sampler.latent_dim)).astype(np.float32)
    default = _in_batches(lambda start, stop: sampler.default(noise[start:stop]), len(noise), config.batch_size, progress)
    return Samples(conditional, requested, default)


def _in_batches(call: Callable[[int, int], np.ndarray], total: int, batch_size: int,
                progress: Callable[[int], None]) -> np.ndarray:
    parts = []
    for start in range(0, total, batch_size):
        parts.append(call(start, min(start + batch_size, total)))
        progress(len(parts[-1]))
    return np.concatenate(parts)


def evaluate(sampler: Sampler, source: str, config: EvaluateConfig,
             report: Callable[[str], None] = print, progress: bool = True) -> list[judge_lib.QualityReport]:
    """[calibration row (real test vs real train), the model's row] for `sampler`."""
    from mnist_data import acquire

    mnist = acquire.load_mnist(config.data_dir, report=report)
    judge = judge_lib.load_judge(config.judge_dir)
    reference = judge_lib.reference(judge, mnist)
    samples = _draw_with_progress(sampler, config, progress)
    row = judge_lib.judge_images(judge, reference, source, samples.conditional, samples.requested, samples.default)
    return [reference.calibration, row]


def _draw_with_progress(sampler: Sampler, config: EvaluateConfig, progress: bool) -> Samples:
    from tqdm import tqdm

    total = config.default_samples + (config.per_digit * NUM_CLASSES if sampler.conditional else 0)
    with tqdm(total=total, unit="img", desc="generating", disable=not progress, leave=False) as bar:
        return draw_samples(sampler, config, progress=bar.update)


def evaluate_bundle(path: str, config: EvaluateConfig, report: Callable[[str], None] = print,
                    progress: bool = True, source: str | None = None) -> list[judge_lib.QualityReport]:
    """Judges the SavedModel bundle at `path` (a `<base>/<version>` folder or a staged candidate)."""
    return evaluate(SignatureSampler(path), source or f"bundle {path}", config, report, progress)


def evaluate_run(run_dir: str, checkpoint: str | None, config: EvaluateConfig, report: Callable[[str], None] = print,
                 progress: bool = True) -> list[judge_lib.QualityReport]:
    """Judges a run's latest checkpoint (or `checkpoint`) through the same signatures an export writes."""
    from export import bundle, signatures

    checkpoint_path = bundle.find_checkpoint(run_dir, checkpoint)
    train_config = bundle.train_config_for(checkpoint_path, run_dir, checkpoint)
    generator, step = bundle.restore_generator(checkpoint_path, train_config)
    source = f"{checkpoint} (step {step})" if checkpoint else f"{run_dir} step {step}"
    with tempfile.TemporaryDirectory(prefix="digitgan-evaluate-") as folder:
        signatures.GeneratorSignatures(generator, train_config.latent_dim, train_config.conditional).write(folder)
        return evaluate(SignatureSampler(folder), source, config, report, progress)


def evaluate_server(server: str, model_name: str, version: int | None, config: EvaluateConfig,
                    report: Callable[[str], None] = print, progress: bool = True) -> list[judge_lib.QualityReport]:
    """Judges a served model over gRPC: exactly the images a TF Serving client receives."""
    sampler = ServerSampler(server, model_name, version)
    reports = evaluate(sampler, f"{model_name} on {server}", config, report, progress)
    if sampler.version is not None:  # name the version that actually answered
        reports[1] = dataclasses.replace(reports[1], source=f"{model_name} v{sampler.version} on {server}")
    return reports


def blessing_gate(config: EvaluateConfig, min_conditional_accuracy: float | None = None,
                  max_frechet_ratio: float | None = None, report: Callable[[str], None] = print,
                  progress: bool = True):
    """An export gate (see `export.bundle.export_bundle`) judging the staged candidate against thresholds."""
    from export import bundle

    if min_conditional_accuracy is not None and not 0.0 < min_conditional_accuracy <= 1.0:
        raise ValueError(f"min_conditional_accuracy must be in (0, 1], got {min_conditional_accuracy!r}")
    if max_frechet_ratio is not None and not max_frechet_ratio > 0.0:
        raise ValueError(f"max_frechet_ratio must be positive, got {max_frechet_ratio!r}")

    def gate(staging) -> bundle.Verdict:
        sampler = SignatureSampler(str(staging))
        if min_conditional_accuracy is not None and not sampler.conditional:  # say so before minutes of judging
            return bundle.Verdict(passed=False, figures={}, failures=(
                "--min-conditional-accuracy needs a conditional model; this one is unconditional",))
        calibration, row = evaluate(sampler, "export candidate", config, report, progress)
        report(judge_lib.format_reports([calibration, row]))
        failures = []
        if min_conditional_accuracy is not None and row.conditional_accuracy < min_conditional_accuracy:
            failures.append(f"conditional accuracy {row.conditional_accuracy:.2%} < {min_conditional_accuracy:.2%}")
        if max_frechet_ratio is not None and row.frechet_ratio > max_frechet_ratio:
            failures.append(f"Fréchet ratio {row.frechet_ratio:.2f} > {max_frechet_ratio:.2f}")
        figures = dict(row.to_dict(), calibration=calibration.to_dict(),
                       thresholds=dict(min_conditional_accuracy=min_conditional_accuracy,
                                       max_frechet_ratio=max_frechet_ratio))
        return bundle.Verdict(passed=not failures, figures=figures, failures=tuple(failures))

    return gate
