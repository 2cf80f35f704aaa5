"""Where judged images come from, and the evaluations `python cli.py evaluate` and the export gate run.

Every source is read through the public signatures, so what is judged is what a client receives:
- a bundle on disk (`evaluate_bundle`; the export gate judges its staged candidate this way);
- a run's checkpoint (`evaluate_run`): the generator is written with the same signatures to a
  temporary SavedModel and judged through it;
- a served model over gRPC (`evaluate_server`), with the standard TF Serving `Predict` calls.

Conditional models are asked for `per_digit` x 10 images through `sample`, each digit in its share
of the real test split (`judge.digits_in_proportion`: compared like with like), with seeds seed,
seed + 1, ...; every model gives `default_samples` images through
`serving_default` from numpy normal noise (seed `seed`), which is where coverage is measured.

Every evaluation is made under each judge (both shipped judges unless others are named) and gives,
per judge, the calibration row and the model's row; gates take the worse judge's figure
(`worst_figures`). `evaluate` can also write two sheets to look at: the least real-looking generated
images (`--sheet`, what precision counts against) and the real test digits farthest from anything
generated (`--missed-sheet`, the styles recall counts as missing).
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from common import files
from quality import judge as judge_lib

log = logging.getLogger(__name__)

NUM_CLASSES = judge_lib.NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """How many images to judge and how they are drawn.

    Attributes:
        per_digit: `sample` images per digit on average for conditional models (1,000 by default):
            per_digit x 10 in all, each digit in its share of the real test split.
        default_samples: `serving_default` images (noise only) for coverage, and for the score and
            Fréchet distance of unconditional models.
        seed: first sample seed, and the seed of the numpy noise.
        batch_size: images per signature call (or per gRPC request).
        data_dir: TFDS data dir holding MNIST (None = TFDS default).
        judge_dirs: judges written by `python cli.py train-judge`, each a folder; empty = both judges
            shipped with the project.
        sheet: where to write the sheet of the SHEET_SIZE least real-looking images (None = no sheet).
        missed_sheet: where to write the sheet of the SHEET_SIZE real test digits farthest from every
            generated image (None = no sheet).
    """

    per_digit: int = 1000
    default_samples: int = 10_000
    seed: int = 0
    batch_size: int = 500
    data_dir: str | None = None
    judge_dirs: tuple[str, ...] = ()
    sheet: str | None = None
    missed_sheet: str | None = None

    def __post_init__(self):
        if isinstance(self.judge_dirs, (str, bytes)):
            raise ValueError(f"judge_dirs must be a sequence of folders, got {self.judge_dirs!r}")
        object.__setattr__(self, "judge_dirs", tuple(str(folder) for folder in self.judge_dirs))
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
    """What a model gave: `conditional` [per_digit*10, 28, 28, 1] for `requested` digits with `seeds`
    (the `sample` signature's inputs), or all three None for an unconditional model; `default`
    [default_samples, 28, 28, 1] from noise."""

    conditional: np.ndarray | None
    requested: np.ndarray | None
    default: np.ndarray
    seeds: np.ndarray | None = None


def draw_samples(sampler: Sampler, config: EvaluateConfig, test_labels: np.ndarray,
                 progress: Callable[[int], None] = lambda count: None) -> Samples:
    """Asks `sampler` for the images `config` describes, `config.batch_size` per call; a conditional
    model's digits come in their shares among `test_labels` (the real test split's labels)."""
    conditional = requested = seeds = None
    if sampler.conditional:
        requested = judge_lib.digits_in_proportion(test_labels, config.per_digit * NUM_CLASSES)
        seeds = config.seed + np.arange(len(requested), dtype=np.int64)
        conditional = _in_batches(lambda start, stop: sampler.sample(requested[start:stop], seeds[start:stop]),
                                  len(requested), config.batch_size, progress)
    noise = np.random.default_rng(config.seed).standard_normal((config.default_samples, sampler.latent_dim)).astype(np.float32)
    default = _in_batches(lambda start, stop: sampler.default(noise[start:stop]), len(noise), config.batch_size, progress)
    return Samples(conditional, requested, default, seeds)


def _in_batches(call: Callable[[int, int], np.ndarray], total: int, batch_size: int,
                progress: Callable[[int], None]) -> np.ndarray:
    parts = []
    for start in range(0, total, batch_size):
        parts.append(call(start, min(start + batch_size, total)))
        progress(len(parts[-1]))
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `evaluate` found: per judge (in the order judged), the calibration row and the model's row."""

    calibrations: tuple[judge_lib.QualityReport, ...]
    rows: tuple[judge_lib.QualityReport, ...]
    sheet: "Sheet | None" = None  # the sheet of least real-looking images, when one was written
    missed_sheet: "Sheet | None" = None  # the sheet of real digits farthest from the generated ones, likewise

    @property
    def reports(self) -> list[judge_lib.QualityReport]:
        """Judge by judge, the calibration row then the model's: what `format_reports` prints."""
        return [report for pair in zip(self.calibrations, self.rows) for report in pair]

    def with_source(self, source: str) -> "Evaluation":
        return dataclasses.replace(self, rows=tuple(dataclasses.replace(row, source=source) for row in self.rows))


# Each figure a gate may use, with the worse of two values: the highest ratio, the lowest share.
WORSE = {
    "frechet_ratio": (max, lambda row: row.frechet_ratio),
    "worst_digit_frechet_ratio": (max, lambda row: None if row.worst_frechet_digit is None
                                  else row.per_digit_frechet_ratio[row.worst_frechet_digit]),
    "mean_digit_frechet_ratio": (max, lambda row: row.mean_digit_frechet_ratio),
    "precision": (min, lambda row: row.precision),
    "recall": (min, lambda row: row.recall),
    "conditional_accuracy": (min, lambda row: row.conditional_accuracy),
    "worst_digit_accuracy": (min, lambda row: None if row.worst_accuracy_digit is None
                             else row.per_digit_accuracy[row.worst_accuracy_digit]),
    "mnist_score": (min, lambda row: row.mnist_score),
}


def worst_figures(rows: Sequence[judge_lib.QualityReport]) -> dict[str, tuple[float, str] | None]:
    """{figure: (the worse value over the judges' rows, the judge that gave it)}, None where no judge gave one."""
    worst = {}
    for name, (worse, figure) in WORSE.items():
        given = [(figure(row), row.judge) for row in rows if figure(row) is not None]
        worst[name] = worse(given, key=lambda pair: pair[0]) if given else None
    return worst


def format_worst(rows: Sequence[judge_lib.QualityReport]) -> str:
    """One line: the worse judge's figure of each kind (what gates hold against thresholds), and which judge."""
    worst = worst_figures(rows)
    formats = {"frechet_ratio": ("Fréchet ratio", "{:.2f}"), "worst_digit_frechet_ratio": ("worst digit's ratio", "{:.2f}"),
               "precision": ("precision", "{:.3f}"), "recall": ("recall", "{:.3f}"),
               "conditional_accuracy": ("cond. acc.", "{:.2%}"), "worst_digit_accuracy": ("worst digit's acc.", "{:.2%}")}
    parts = [f"{label} {number.format(worst[name][0])} ({worst[name][1]})" for name, (label, number) in formats.items()
             if worst[name] is not None]
    return "worse judge: " + ", ".join(parts)


def evaluate(sampler: Sampler, source: str, config: EvaluateConfig,
             report: Callable[[str], None] = print, progress: bool = True) -> Evaluation:
    """Judges `sampler` under every judge of `config`; writes each sheet `config` names a file for."""
    from mnist_data import acquire

    judges = judge_lib.load_judges(config.judge_dirs)  # a missing or changed judge is refused before any work
    mnist = acquire.load_mnist(config.data_dir, report=report)
    references = [_reference(judge, mnist, config.data_dir) for judge in judges]
    samples = _draw_with_progress(sampler, config, mnist.test_labels, progress)
    judged = [judge_lib.judge_samples(judge, reference, source, samples.conditional, samples.requested, samples.default)
              for judge, reference in zip(judges, references)]
    sheet = None
    if config.sheet:
        realism = np.min([one.realism for one in judged], axis=0)  # the worse judge's reading of each image
        sheet = write_least_real_sheet(config.sheet, samples, realism, [judge.name for judge in judges])
    missed_sheet = None
    if config.missed_sheet:
        miss = np.max([one.miss for one in judged], axis=0)  # the worse judge's reading of each real digit
        missed_sheet = write_missed_sheet(config.missed_sheet, mnist.test_images, mnist.test_labels, miss,
                                          [judge.name for judge in judges])
    return Evaluation(tuple(reference.calibration for reference in references), tuple(one.report for one in judged),
                      sheet, missed_sheet)


def calibration_rows(config: EvaluateConfig, mnist) -> list[judge_lib.QualityReport]:
    """Each of `config`'s judges' calibration row (real digits against real digits), in order; free in a
    process that has already evaluated with them (`_reference` keeps the real side)."""
    return [_reference(judge, mnist, config.data_dir).calibration for judge in judge_lib.load_judges(config.judge_dirs)]


# The real side of a judge's figures depends only on its weights and on MNIST, so a process that
# evaluates again (the bench after each leg, the export gate) reads the real digits once per judge.
_REFERENCES: dict[tuple[str, str | None], judge_lib.Reference] = {}
REFERENCE_FOLDER = "digitgan_references"  # in MNIST's data dir: each judge's real side, one file per judge


def _reference(judge: judge_lib.Judge, mnist, data_dir: str | None) -> judge_lib.Reference:
    key = (judge.manifest["sha256"], data_dir)
    if key not in _REFERENCES:
        _REFERENCES[key] = stored_reference(judge, mnist, data_dir)
    return dataclasses.replace(_REFERENCES[key], calibration=dataclasses.replace(
        _REFERENCES[key].calibration, judge=judge.name))  # the same weights may be named otherwise


def stored_reference(judge: judge_lib.Judge, mnist, data_dir: str | None) -> judge_lib.Reference:
    """`judge_lib.reference(judge, mnist)`, kept beside MNIST in `data_dir` so that the next process
    reads it instead of judging 60,000 real digits again (up to minutes on a slow CPU).

    The file is named by the judge's weights and `judge_lib.reference_fingerprint`: other weights,
    data, code or library versions never read it, and writing it removes the judge's files of
    other fingerprints. One that cannot be read is computed again and replaced.
    """
    path = reference_path(judge, mnist, data_dir)

    def compute_and_keep() -> judge_lib.Reference:
        reference = judge_lib.reference(judge, mnist)
        _keep_reference(judge, reference, path)
        return reference

    def waiting() -> None:
        log.info("waiting for another process computing %s's real-digit figures in %s", judge.name, path.parent)

    # Processes sharing the data dir (a bench's recipes, evaluations) compute it once: the others wait, then read it.
    return files.read_or_make_once(lambda: _read_reference(path), compute_and_keep,
                                   path.parent / f"{_judge_prefix(judge)}.lock", on_wait=waiting)


def _read_reference(path: Path) -> judge_lib.Reference | None:
    try:
        return judge_lib.load_reference(path)
    except (OSError, ValueError):
        return None  # not written yet, or unreadable: compute it


def _keep_reference(judge: judge_lib.Judge, reference: judge_lib.Reference, path: Path) -> None:
    try:
        judge_lib.save_reference(reference, path)
        for outdated in set(path.parent.glob(f"{_judge_prefix(judge)}-*.npz")) - {path}:
            outdated.unlink(missing_ok=True)
    except OSError as error:  # a read-only data dir costs time, not the evaluation
        log.warning("could not keep the judge's real-digit figures in %s: %s", path.parent, error)


def reference_path(judge: judge_lib.Judge, mnist, data_dir: str | None) -> Path:
    """Where `stored_reference` keeps `judge`'s real side:
    `<data dir>/digitgan_references/<weights' sha256, 16 digits>-<fingerprint>.npz`."""
    from mnist_data import acquire

    folder = Path(data_dir or acquire.default_data_dir()) / REFERENCE_FOLDER
    return folder / f"{_judge_prefix(judge)}-{judge_lib.reference_fingerprint(judge, mnist)}.npz"


def _judge_prefix(judge: judge_lib.Judge) -> str:
    return judge.manifest["sha256"][:16]  # names the judge's files, so a new one can replace the old


SHEET_SIZE = 64  # images on the sheet: 8 rows of 8
SHEET_COLUMNS = 8


@dataclasses.dataclass(frozen=True)
class Sheet:
    """A written sheet: its path, and its cells' labels and scores in the order shown (the realism score,
    lowest first, on the least-real sheet; the miss, highest first, on the missed sheet)."""

    path: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]


def least_real(realism: np.ndarray, count: int = SHEET_SIZE) -> np.ndarray:
    """Indices of the `count` lowest realism scores, lowest first (ties in index order)."""
    return np.argsort(realism, kind="stable")[:count]


def write_least_real_sheet(path: str, samples: Samples, realism: np.ndarray, judge_names: Sequence[str],
                           count: int = SHEET_SIZE) -> Sheet:
    """Writes the `count` judged images with the lowest realism as one PNG, least real first, each with
    its digit and seed under it (`#i` for the i-th serving_default image of an unconditional model)."""
    chosen = least_real(realism, count)
    if samples.conditional is not None:
        images = samples.conditional[chosen]
        labels = [f"{samples.requested[index]} s{samples.seeds[index]}" for index in chosen]
        caption = (f"The {len(chosen)} least real of {len(realism)} sample digits (lowest realism score, worse of "
                   f"judges {' and '.join(judge_names)})\nleast real first; under each: digit, s + seed")
    else:
        images = samples.default[chosen]
        labels = [f"#{index}" for index in chosen]
        caption = (f"The {len(chosen)} least real of {len(realism)} serving_default images (lowest realism score, "
                   f"worse of judges {' and '.join(judge_names)})\nleast real first; under each: # + row of noise")
    return _write_sheet(path, images, labels, caption, realism[chosen])


def most_missed(miss: np.ndarray, count: int = SHEET_SIZE) -> np.ndarray:
    """Indices of the `count` highest misses, highest first (ties in index order)."""
    return np.argsort(-miss, kind="stable")[:count]


def write_missed_sheet(path: str, test_images: np.ndarray, test_labels: np.ndarray, miss: np.ndarray,
                       judge_names: Sequence[str], count: int = SHEET_SIZE) -> Sheet:
    """Writes the `count` real test digits with the highest miss (`measures.Manifolds.miss`: farthest from
    every generated image) as one PNG, highest first, each with its digit and test-split index under it.
    test_images uint8 [N, 28, 28, 1]; test_labels [N]; miss [N]."""
    chosen = most_missed(miss, count)
    labels = [f"{test_labels[index]} #{index}" for index in chosen]
    caption = (f"The {len(chosen)} of {len(miss)} real test digits farthest from every generated one (highest miss, "
               f"worse of judges {' and '.join(judge_names)})\nstyles the model draws least; under each: digit, # + "
               "index in the test split")
    return _write_sheet(path, judge_lib.real_images(test_images[chosen]), labels, caption, miss[chosen])


def _write_sheet(path: str, images: np.ndarray, labels: list[str], caption: str, scores: np.ndarray) -> Sheet:
    """Writes `images` float32 [n, 28, 28, 1] in [0, 1] as one labelled PNG grid, atomically."""
    from common import images as image_grids

    picture = image_grids.labelled_grid(images, labels, columns=SHEET_COLUMNS, caption=caption)
    files.write_bytes_atomic(path, image_grids.png_bytes(picture))
    return Sheet(str(path), tuple(labels), tuple(float(score) for score in scores))


def _draw_with_progress(sampler: Sampler, config: EvaluateConfig, test_labels: np.ndarray, progress: bool) -> Samples:
    from tqdm import tqdm

    total = config.default_samples + (config.per_digit * NUM_CLASSES if sampler.conditional else 0)
    with tqdm(total=total, unit="img", desc="generating", disable=not progress, leave=False) as bar:
        return draw_samples(sampler, config, test_labels, progress=bar.update)


def evaluate_bundle(path: str, config: EvaluateConfig, report: Callable[[str], None] = print,
                    progress: bool = True, source: str | None = None) -> Evaluation:
    """Judges the SavedModel bundle at `path` (a `<base>/<version>` folder or a staged candidate)."""
    return evaluate(SignatureSampler(path), source or f"bundle {path}", config, report, progress)


def evaluate_run(run_dir: str, checkpoint: str | None, config: EvaluateConfig, report: Callable[[str], None] = print,
                 progress: bool = True) -> Evaluation:
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
                    report: Callable[[str], None] = print, progress: bool = True) -> Evaluation:
    """Judges a served model over gRPC: exactly the images a TF Serving client receives."""
    sampler = ServerSampler(server, model_name, version)
    evaluation = evaluate(sampler, f"{model_name} on {server}", config, report, progress)
    if sampler.version is not None:  # name the version that actually answered
        evaluation = evaluation.with_source(f"{model_name} v{sampler.version} on {server}")
    return evaluation


GATE_THRESHOLDS = {  # threshold name → (figure in WORSE, passes(value, threshold), how a failure reads)
    "min_conditional_accuracy": ("conditional_accuracy", lambda value, line: value >= line, "conditional accuracy {:.2%} < {:.2%}"),
    "max_frechet_ratio": ("frechet_ratio", lambda value, line: value <= line, "Fréchet ratio {:.2f} > {:.2f}"),
    "min_precision": ("precision", lambda value, line: value >= line, "precision {:.3f} < {:.3f}"),
    "min_recall": ("recall", lambda value, line: value >= line, "recall {:.3f} < {:.3f}"),
}


def blessing_gate(config: EvaluateConfig, min_conditional_accuracy: float | None = None,
                  max_frechet_ratio: float | None = None, report: Callable[[str], None] = print,
                  progress: bool = True, min_precision: float | None = None, min_recall: float | None = None):
    """An export gate (see `export.bundle.export_bundle`) judging the staged candidate against thresholds,
    under every judge of `config`: each threshold is held against the worse judge's figure."""
    from export import bundle

    thresholds = dict(min_conditional_accuracy=min_conditional_accuracy, max_frechet_ratio=max_frechet_ratio,
                      min_precision=min_precision, min_recall=min_recall)
    for name in ("min_conditional_accuracy", "min_precision", "min_recall"):
        if thresholds[name] is not None and not 0.0 < thresholds[name] <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {thresholds[name]!r}")
    if max_frechet_ratio is not None and not max_frechet_ratio > 0.0:
        raise ValueError(f"max_frechet_ratio must be positive, got {max_frechet_ratio!r}")

    def gate(staging) -> bundle.Verdict:
        sampler = SignatureSampler(str(staging))
        if min_conditional_accuracy is not None and not sampler.conditional:  # say so before minutes of judging
            return bundle.Verdict(passed=False, figures={}, failures=(
                "--min-conditional-accuracy needs a conditional model; this one is unconditional",))
        evaluation = evaluate(sampler, "export candidate", config, report, progress)
        report(judge_lib.format_reports(evaluation.reports))
        worst = worst_figures(evaluation.rows)
        failures = []
        for name, line in thresholds.items():
            figure, passes, reads = GATE_THRESHOLDS[name]
            if line is not None and worst[figure] is None:
                failures.append(f"{name}: no judge measured {figure.replace('_', ' ')}")
            elif line is not None and not passes(worst[figure][0], line):
                failures.append(reads.format(worst[figure][0], line) + f" (judge {worst[figure][1]})")
        figures = dict({figure: None if pair is None else pair[0] for figure, pair in worst.items()},
                       worse_judge={figure: None if pair is None else pair[1] for figure, pair in worst.items()},
                       samples=evaluation.rows[0].samples, thresholds=thresholds,
                       judges=[dict(row.to_dict(), calibration=calibration.to_dict())
                               for calibration, row in zip(evaluation.calibrations, evaluation.rows)])
        return bundle.Verdict(passed=not failures, figures=figures, failures=tuple(failures))

    return gate
