"""Versioned, atomic, validated export of a digitgan generator as a TensorFlow Serving bundle.

`export_bundle(config)` restores the generator from a training checkpoint, writes the SavedModel
(tag `serve`) plus `assets.extra/tf_serving_warmup_requests` (TF Serving's warmup format) and
`assets.extra/digitgan.json` (metadata readable without TensorFlow) into a non-numeric temporary
sibling (`<model-base-path>/.export-<version>-<random>`, which TF Serving ignores), validates it in
a freshly loaded copy, and only then renames it to `<model-base-path>/<version>`. Any failure
removes the temporary directory: a server polling the base path never sees a partial version.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from common import files, precision
from export import signatures as signatures_lib
from trainer import models
from trainer.config import TrainConfig

WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "digitgan.json"
WARMUP_BATCH_SIZES = (1, 8)


class ExportError(ValueError):
    """The export could not be done; nothing was published. The message says what to do."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """One export: which checkpoint, where to, and which version number."""

    run_dir: str = "runs/default"
    """The training run whose newest checkpoint (and config.json) to export."""
    checkpoint: str | None = None
    """A specific checkpoint prefix (e.g. runs/default/checkpoints/ckpt-400); None = the run's newest."""
    model_base_path: str = "models/digitgan"
    """TF Serving's --model_base_path: the folder holding the numeric version folders."""
    model_name: str = "digitgan"
    """The model name written into the warmup requests (TF Serving ignores it there, but clients read it)."""
    version: int | None = None
    """The version number to write; None = one more than the highest present (1 when there is none)."""
    overwrite: bool = False
    """Replace an existing version of the same number (atomically) instead of refusing."""
    commands: tuple[str, ...] = ()
    """The command lines that made this bundle (training, export), recorded in its metadata as `commands`."""

    def __post_init__(self) -> None:
        if self.version is not None and not 1 <= self.version < 2**63:
            raise ValueError(f"version must be a positive integer, got {self.version!r}")
        if not self.model_base_path:
            raise ValueError(f"model_base_path must be a directory path, got {self.model_base_path!r}")
        if not self.model_name:
            raise ValueError(f"model_name must not be empty, got {self.model_name!r}")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: str
    version: int
    signatures: dict  # name → {"inputs": {alias: "dtype shape"}, "outputs": {...}}
    step: int


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A blessing gate's judgement of a staged candidate (TFX's Evaluator → Pusher, in one step)."""

    passed: bool
    figures: dict  # written into the bundle's metadata under "evaluation", published or not
    failures: tuple[str, ...] = ()  # one line per threshold missed


Gate = Callable[[Path], Verdict]


def export_bundle(config: ExportConfig, gate: Gate | None = None) -> ExportResult:
    """Exports the generator of `config.run_dir` as `<model_base_path>/<version>`; see the module docstring.

    With a `gate`, the validated candidate is judged before the rename; a candidate that falls short
    is kept, unpublished, at `<model_base_path>/.rejected-<version>` (TF Serving ignores the name) and
    ExportError says which thresholds it missed.
    """
    checkpoint_path = find_checkpoint(config.run_dir, config.checkpoint)
    train_config = train_config_for(checkpoint_path, config.run_dir, config.checkpoint)
    generator, step = restore_generator(checkpoint_path, train_config)
    base = Path(config.model_base_path)
    version = config.version or next_version(base)
    target = base / str(version)
    if target.exists() and not config.overwrite:
        raise ExportError(f"version {version} already exists at {target}; pass --overwrite to replace it, "
                          "or leave --version out to write the next number")
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=base))
        staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
    except OSError as error:
        raise ExportError(f"cannot write to {base}: {error.strerror}") from None
    try:
        module = signatures_lib.GeneratorSignatures(generator, train_config.latent_dim, train_config.conditional)
        module.write(str(staging))
        write_warmup(staging, config.model_name, module)
        metadata = _metadata(config, train_config, checkpoint_path, step, version)
        files.write_json_atomic(staging / "assets.extra" / METADATA_FILE, metadata)
        described = validate_bundle(staging, module)
        if gate is not None:
            verdict = gate(staging)
            metadata = dict(metadata, evaluation=dict(verdict.figures, blessed=verdict.passed))
            files.write_json_atomic(staging / "assets.extra" / METADATA_FILE, metadata)
            if not verdict.passed:
                kept = _keep_rejected(staging, base, version)
                raise ExportError(f"version {version} not published: " + "; ".join(verdict.failures)
                                  + f" (the candidate is kept at {kept})")
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(str(target), version, described, step)


def _keep_rejected(staging: Path, base: Path, version: int) -> Path:
    """Moves a rejected candidate to `.rejected-<version>` (replacing an older reject) for inspection."""
    kept = base / f".rejected-{version}"
    shutil.rmtree(kept, ignore_errors=True)
    try:
        staging.rename(kept)
    except OSError as error:
        raise ExportError(f"version {version} not published, and the rejected candidate could not be kept "
                          f"at {kept}: {error.strerror}") from None
    return kept


def next_version(base: Path) -> int:
    """One more than the highest numeric child of `base` (TF Serving's notion of a version), else 1."""
    numbers = [int(child.name) for child in base.iterdir() if child.is_dir() and child.name.isdigit()] if base.is_dir() else []
    return max(numbers, default=0) + 1


def find_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """`checkpoint` when given (it must exist), else the newest checkpoint of `run_dir`."""
    if checkpoint:
        if not tf.io.gfile.exists(checkpoint + ".index"):
            raise ExportError(f"no checkpoint at '{checkpoint}' (expected {checkpoint}.index)")
        return checkpoint
    latest = tf.train.latest_checkpoint(str(Path(run_dir) / "checkpoints"))
    if latest is None:
        raise ExportError(f"no checkpoint in run dir '{run_dir}'; train first (python cli.py train "
                          f"--run-dir {run_dir}) or pass --checkpoint")
    return latest


def train_config_for(checkpoint_path: str, run_dir: str, checkpoint: str | None = None) -> TrainConfig:
    """The TrainConfig saved with the run that wrote `checkpoint_path` (its run dir is two levels up)."""
    return TrainConfig.load(str(Path(checkpoint_path).parent.parent) if checkpoint else run_dir)


def restore_generator(checkpoint_path: str, train_config: TrainConfig):
    """Builds the run's generator and restores its weights (only the generator) from the checkpoint.

    When the run kept a moving average of the generator (`generator_average`), that average is
    what is restored: it draws cleaner digits than the last training step's weights.
    """
    with precision.float32_policy():  # a bundle computes in float32, even written by a process that trained in bf16
        generator = models.build_generator_of(train_config)
    step = tf.Variable(0, dtype=tf.int64)
    try:
        key = _generator_key(checkpoint_path)
        status = tf.train.Checkpoint(**{key: generator}, step=step).restore(checkpoint_path)
        status.expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise ExportError(f"checkpoint '{checkpoint_path}' does not hold a generator of this architecture "
                          f"(latent_dim={train_config.latent_dim}, conditional={train_config.conditional}, "
                          f"architecture={train_config.architecture}): "
                          f"{str(error).splitlines()[0][:300]}") from None
    return generator, int(step.numpy())


def _generator_key(checkpoint_path: str) -> str:
    """`generator_average` when the checkpoint holds one, else `generator`; refuses checkpoints with neither
    (e.g. a classifier's), which would otherwise restore nothing."""
    keys = tf.train.load_checkpoint(checkpoint_path).get_variable_to_shape_map()
    for name in ("generator_average", "generator"):
        if any(key.startswith(f"{name}/") for key in keys):
            return name
    raise ValueError("the checkpoint has no generator")


def write_warmup(bundle: Path, model_name: str, module: signatures_lib.GeneratorSignatures) -> Path:
    """Writes one Predict request per signature and batch size as PredictionLog records (TF Serving warmup)."""
    path = bundle / "assets.extra" / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for name, inputs in warmup_inputs(module):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = name
            for alias, array in inputs.items():
                request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def warmup_inputs(module: signatures_lib.GeneratorSignatures):
    """(signature name, {alias: numpy input}) pairs: every signature at every warmup batch size."""
    rng = np.random.default_rng(0)
    for batch in WARMUP_BATCH_SIZES:
        noise = rng.standard_normal((batch, module.latent_dim)).astype(np.float32)
        digits = (np.arange(batch) % signatures_lib.NUM_CLASSES).astype(np.int32)
        seeds = np.arange(batch, dtype=np.int64)
        yield "serving_default", {"noise": noise}
        if module.conditional:
            yield "conditional", {"noise": noise, "digit": digits}
            yield "sample", {"digit": digits, "seed": seeds}
        else:
            yield "sample", {"seed": seeds}


def validate_bundle(bundle: Path, module: signatures_lib.GeneratorSignatures) -> dict:
    """Loads `bundle` afresh and checks it against the in-memory generator; returns the signature summary.

    Raises ExportError when serving_default differs from the generator, `sample` is not
    deterministic, an out-of-range digit is accepted, or a warmup record fails.
    """
    loaded = tf.saved_model.load(str(bundle))
    served = loaded.signatures
    noise = tf.constant(np.random.default_rng(1).standard_normal((4, module.latent_dim)), tf.float32)
    expected = module.serving_default(noise)["images"].numpy()
    actual = served["serving_default"](noise=noise)["images"].numpy()
    if not np.allclose(expected, actual, atol=1e-5):
        raise ExportError(f"serving_default differs from the generator by {np.abs(expected - actual).max():.2e}")
    for name, inputs in warmup_inputs(module):
        outputs = served[name](**{alias: tf.constant(array) for alias, array in inputs.items()})
        if name == "sample":
            again = served[name](**{alias: tf.constant(array) for alias, array in inputs.items()})
            if not np.array_equal(outputs["images"].numpy(), again["images"].numpy()):
                raise ExportError("sample is not deterministic for a fixed seed")
    _check_warmup_records(bundle, served)
    if module.conditional:
        _expect_rejected(served["sample"], digit=tf.constant([10], tf.int32), seed=tf.constant([0], tf.int64))
    return describe_signatures(served)


def _check_warmup_records(bundle: Path, served) -> None:
    for record in tf.data.TFRecordDataset(str(bundle / "assets.extra" / WARMUP_FILE)):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        inputs = {alias: tf.constant(tf.make_ndarray(proto)) for alias, proto in request.inputs.items()}
        served[request.model_spec.signature_name](**inputs)


def _expect_rejected(function, **inputs) -> None:
    try:
        function(**inputs)
    except tf.errors.InvalidArgumentError:
        return
    raise ExportError("the sample signature accepted digit 10; digits outside 0..9 must be rejected")


def describe_signatures(served) -> dict:
    """{name: {"inputs": {alias: "int32 [-1]"}, "outputs": {...}}} for the loaded signatures."""

    def spec(tensor_spec) -> str:
        dims = ", ".join("-1" if dim is None else str(dim) for dim in tensor_spec.shape)
        return f"{tensor_spec.dtype.name} [{dims}]"

    summary = {}
    for name, function in sorted(served.items()):
        inputs = function.structured_input_signature[1]
        summary[name] = {"inputs": {alias: spec(value) for alias, value in sorted(inputs.items())},
                         "outputs": {alias: spec(value) for alias, value in sorted(function.structured_outputs.items())}}
    return summary


def _metadata(config: ExportConfig, train_config: TrainConfig, checkpoint_path: str, step: int, version: int) -> dict:
    return {
        "model_name": config.model_name,
        "version": version,
        "run_dir": str(Path(checkpoint_path).parent.parent),
        "checkpoint": checkpoint_path,
        "step": step,
        "train_config": dataclasses.asdict(train_config),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "commands": list(config.commands),
        "signatures_doc": signatures_lib.__doc__.strip().splitlines()[0],
    }


def read_metadata(bundle: str | Path) -> dict:
    """The bundle's metadata, without loading the model."""
    return json.loads((Path(bundle) / "assets.extra" / METADATA_FILE).read_text())


def _publish(staging: Path, target: Path) -> None:
    """Renames the validated staging folder to `target`, replacing an old one only after it is moved aside."""
    retired = None
    if target.exists():
        retired = target.with_name(f".retired-{target.name}-{staging.name.rsplit('-', 1)[-1]}")
        target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        if retired is not None:
            retired.rename(target)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
