"""Export: versions, atomicity, signatures as TF Serving sees them, warmup records, bad input."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from common import precision
from export import bundle
from trainer import strategy as strategy_lib


def _export(run_dir: str, base: Path, gate=None, **options) -> bundle.ExportResult:
    return bundle.export_bundle(bundle.ExportConfig(run_dir=run_dir, model_base_path=str(base), **options), gate=gate)


def _numeric_children(base: Path) -> list[str]:
    return sorted(child.name for child in base.iterdir() if child.name.isdigit())


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> str:
    """A run dir with an untrained model's checkpoint (step 0) and config.json, saved as a training run saves them."""
    from trainer import checkpoints, step as step_lib
    from trainer.config import TrainConfig

    config = TrainConfig(run_dir=str(tmp_path_factory.mktemp("untrained")), precision="float32")
    strategy = tf.distribute.get_strategy()
    state = step_lib.set_globals_and_build_state(config, strategy)
    checkpoints.save(checkpoints.manager(state.checkpoint(), config, strategy), state, 0)
    config.save()
    return config.run_dir


def _check_images(images: tf.Tensor, count: int) -> None:
    assert images.dtype == tf.float32 and images.shape == (count, 28, 28, 1)
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0


def test_an_untrained_checkpoint_exports_signatures_that_load_and_answer(untrained_run, tmp_path):
    """The fast lane's export: the default model untrained, exported, loaded back, every signature called."""
    result = _export(untrained_run, tmp_path / "digitgan")
    assert (result.version, result.step) == (1, 0) and Path(result.path) == tmp_path / "digitgan" / "1"
    assert set(result.signatures) == {"serving_default", "conditional", "sample"}
    loaded = tf.saved_model.load(result.path)
    noise = tf.random.stateless_normal([3, 100], seed=[1, 2])
    _check_images(loaded.signatures["serving_default"](noise=noise)["images"], 3)
    _check_images(loaded.signatures["conditional"](noise=noise, digit=tf.constant([0, 5, 9]))["images"], 3)
    sampled = loaded.signatures["sample"](digit=tf.constant([7, 7]), seed=tf.constant([42, 42], tf.int64))
    _check_images(sampled["images"], 2)
    assert sampled["png_bytes"].shape == (2,) and sampled["png_bytes"][0].numpy().startswith(b"\x89PNG")
    np.testing.assert_array_equal(sampled["images"][0], sampled["images"][1])  # same digit and seed, same image
    assert bundle.read_metadata(result.path)["step"] == 0


def test_the_gate_judges_an_untrained_candidate_with_the_shipped_judges(untrained_run, mnist_data_dir, tmp_path,
                                                                      monkeypatch):
    """The fast lane's quality check: the blessing gate (quality.sources) judges the untrained export with
    both shipped judges against a handful of real MNIST images, refuses it and records their figures."""
    import tensorflow_datasets as tfds

    from mnist_data import acquire
    from quality import sources

    (train_images, train_labels), (test_images, test_labels) = tfds.as_numpy(tfds.load(
        "mnist", split=["train[:100]", "test[:100]"], data_dir=mnist_data_dir, batch_size=-1, as_supervised=True,
        download=False))
    handful = acquire.Mnist(train_images, train_labels.astype(np.int64), test_images, test_labels.astype(np.int64))
    monkeypatch.setattr(acquire, "load_mnist", lambda data_dir=None, report=None: handful)
    gate = sources.blessing_gate(sources.EvaluateConfig(per_digit=5, default_samples=50, batch_size=50),
                                 min_conditional_accuracy=0.99, report=lambda line: None, progress=False)
    base = tmp_path / "digitgan"
    with pytest.raises(bundle.ExportError, match=r"version 1 not published: conditional accuracy .* < 99.00%"):
        _export(untrained_run, base, gate=gate)
    assert _numeric_children(base) == []
    evaluation = bundle.read_metadata(base / ".rejected-1")["evaluation"]
    assert evaluation["blessed"] is False and evaluation["samples"] == 50 and evaluation["conditional_accuracy"] < 0.99
    judged = {row["judge"]: row for row in evaluation["judges"]}
    assert set(judged) == {"small", "wide"}  # both shipped judges
    for row in judged.values():
        assert len(row["coverage"]) == 10 and row["frechet_ratio"] > 1.0
        calibration = row["calibration"]  # each judge on the 100 real test images
        assert calibration["samples"] == 100 and calibration["conditional_accuracy"] >= 0.97, calibration


@pytest.mark.slow
@pytest.mark.skipif(not strategy_lib.has_bfloat16_instructions(),
                    reason="the CPU has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 would be emulated")
def test_a_bfloat16_run_exports_a_bundle_that_computes_in_float32(mnist_data_dir, tmp_path):
    """tiny_runs train in float32 everywhere; this run asks for mixed_bfloat16 explicitly."""
    from trainer import loop
    from trainer.config import TrainConfig

    config = TrainConfig(run_dir=str(tmp_path / "run"), data_dir=mnist_data_dir, max_steps=2, batch_size=16,
                         cpu_replicas=2, steps_per_call=2, precision="mixed_bfloat16")
    loop.train(config, report=lambda line: None, progress=False)
    assert TrainConfig.load(config.run_dir).precision == "mixed_bfloat16"
    result = _export(config.run_dir, tmp_path / "digitgan")
    assert result.signatures["conditional"]["outputs"] == {"images": "float32 [-1, 28, 28, 1]"}
    loaded = tf.saved_model.load(result.path)
    noise = tf.random.stateless_normal([2, 100], seed=[3, 4])
    _check_images(loaded.signatures["conditional"](noise=noise, digit=tf.constant([1, 8]))["images"], 2)


@pytest.mark.slow
def test_versions_are_numbered_and_overwrite_is_explicit(tiny_runs, tmp_path):
    base = tmp_path / "digitgan"
    assert _export(tiny_runs["conditional"], base).version == 1
    assert _export(tiny_runs["conditional"], base).version == 2
    assert _export(tiny_runs["conditional"], base, version=7).version == 7
    assert _export(tiny_runs["conditional"], base).version == 8
    with pytest.raises(bundle.ExportError, match="version 7 already exists"):
        _export(tiny_runs["conditional"], base, version=7)
    assert _export(tiny_runs["conditional"], base, version=7, overwrite=True).version == 7
    assert _numeric_children(base) == ["1", "2", "7", "8"]
    assert [child.name for child in base.iterdir() if not child.name.isdigit()] == []  # no temp leftovers


@pytest.mark.slow
def test_failed_validation_publishes_nothing(tiny_runs, tmp_path):
    base = tmp_path / "digitgan"
    with mock.patch.object(bundle, "validate_bundle", side_effect=bundle.ExportError("simulated failure")):
        with pytest.raises(bundle.ExportError, match="simulated failure"):
            _export(tiny_runs["conditional"], base)
    assert list(base.iterdir()) == []


@pytest.mark.slow
def test_signatures_as_saved_model_cli_lists_them(tiny_runs, tmp_path):
    result = _export(tiny_runs["conditional"], tmp_path / "digitgan")
    shown = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir",
                            result.path, "--all"], capture_output=True, text=True, check=True).stdout
    for signature in ("serving_default", "conditional", "sample"):
        assert f"signature_def['{signature}']" in shown
    assert result.signatures == {
        "conditional": {"inputs": {"digit": "int32 [-1]", "noise": "float32 [-1, 100]"},
                        "outputs": {"images": "float32 [-1, 28, 28, 1]"}},
        "sample": {"inputs": {"digit": "int32 [-1]", "seed": "int64 [-1]"},
                   "outputs": {"images": "float32 [-1, 28, 28, 1]", "png_bytes": "string [-1]"}},
        "serving_default": {"inputs": {"noise": "float32 [-1, 100]"}, "outputs": {"images": "float32 [-1, 28, 28, 1]"}},
    }


def _stored_values(bundle_path: str) -> dict[str, int]:
    """{checkpoint key: number of values} of a bundle's variables, without the object-graph entry."""
    listed = tf.train.list_variables(str(Path(bundle_path) / "variables" / "variables"))
    return {name: int(np.prod(shape)) for name, shape in listed if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _v1_session_images(bundle_path: str, noise: np.ndarray) -> np.ndarray:
    """serving_default's images through a TF1 loader in a session (restores with the bundle's saver)."""
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], bundle_path)
        signature = meta_graph.signature_def["serving_default"]
        return session.run(signature.outputs["images"].name, {signature.inputs["noise"].name: noise})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_the_bundle_stores_each_weight_once(tiny_runs, tmp_path, kind):
    """keras-team/keras#23553: tracking the Keras model stored every weight twice (and loaders restored both)."""
    from trainer.config import TrainConfig

    result = _export(tiny_runs[kind], tmp_path / "digitgan")
    generator, _ = bundle.restore_generator(bundle.find_checkpoint(tiny_runs[kind]), TrainConfig.load(tiny_runs[kind]))
    stored = _stored_values(result.path)
    assert sum(stored.values()) == generator.count_params(), sorted(stored)
    assert len(stored) == len(generator.weights)
    noise = np.random.default_rng(3).standard_normal((3, 100)).astype(np.float32)
    loaded = tf.saved_model.load(result.path)
    expected = loaded.signatures["serving_default"](noise=tf.constant(noise))["images"].numpy()
    np.testing.assert_allclose(_v1_session_images(result.path, noise), expected, atol=1e-6)  # every weight restored
    saved = sorted(tuple(variable.shape) for variable in loaded.generator_variables)
    assert saved == sorted(tuple(weight.shape) for weight in generator.weights)


@pytest.mark.slow
def test_the_tensorflow_c_api_loads_the_bundle_and_runs_every_signature(tiny_runs, tmp_path):
    """TF_LoadSessionFromSavedModel: the C++ LoadSavedModel that tensorflow_model_server uses."""
    from tensorflow.core.protobuf import saved_model_pb2

    import tf_c_api

    for kind in ("conditional", "unconditional"):
        path = _export(tiny_runs[kind], tmp_path / kind).path
        on_disk = saved_model_pb2.SavedModel.FromString((Path(path) / "saved_model.pb").read_bytes())
        served = tf.saved_model.load(path).signatures
        noise = np.random.default_rng(4).standard_normal((5, 100)).astype(np.float32)
        digit, seed = np.array([0, 3, 7, 9, 7], np.int32), np.array([42, 1, 42, 8, 43], np.int64)
        with tf_c_api.SavedModelSession(path) as session:
            assert session.meta_graph.signature_def == on_disk.meta_graphs[0].signature_def
            signatures = set(session.meta_graph.signature_def) - {"__saved_model_init_op"}
            assert signatures == ({"serving_default", "conditional", "sample"} if kind == "conditional"
                                  else {"serving_default", "sample"})
            images = session.run("serving_default", {"noise": noise})["images"]
            assert images.shape == (5, 28, 28, 1) and 0.0 <= images.min() and images.max() <= 1.0
            np.testing.assert_allclose(images, served["serving_default"](noise=tf.constant(noise))["images"].numpy(),
                                       atol=1e-6)
            sample_inputs = {"digit": digit, "seed": seed} if kind == "conditional" else {"seed": seed}
            sample = session.run("sample", sample_inputs)
            assert set(sample) == {"images", "png_bytes"} and sample["png_bytes"].shape == (5,)
            expected = served["sample"](**{alias: tf.constant(value) for alias, value in sample_inputs.items()})
            np.testing.assert_allclose(sample["images"], expected["images"].numpy(), atol=1e-6)
            for png, image in zip(sample["png_bytes"], sample["images"]):
                np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), np.round(image * 255).astype(np.uint8))
            if kind == "conditional":
                conditional = session.run("conditional", {"noise": noise, "digit": digit})["images"]
                assert conditional.shape == (5, 28, 28, 1) and 0.0 <= conditional.min() and conditional.max() <= 1.0
                np.testing.assert_allclose(conditional, served["conditional"](noise=tf.constant(noise),
                                                                              digit=tf.constant(digit))["images"].numpy(),
                                           atol=1e-6)
                with pytest.raises(tf_c_api.TFError, match="digit must be in 0..9") as refused:
                    session.run("sample", {"digit": np.array([10], np.int32), "seed": np.array([0], np.int64)})
                assert refused.value.code == 3  # INVALID_ARGUMENT, what TF Serving then returns


@pytest.mark.slow
def test_sample_is_deterministic_and_checks_digits(tiny_runs, tmp_path):
    served = tf.saved_model.load(_export(tiny_runs["conditional"], tmp_path / "digitgan").path).signatures
    inputs = dict(digit=tf.constant([7, 7, 3], tf.int32), seed=tf.constant([42, 43, 42], tf.int64))
    first, second = served["sample"](**inputs), served["sample"](**inputs)
    np.testing.assert_array_equal(first["images"].numpy(), second["images"].numpy())
    assert not np.array_equal(first["images"][0].numpy(), first["images"][1].numpy())  # other seed, other image
    assert first["png_bytes"].numpy()[0].startswith(b"\x89PNG")
    decoded = tf.io.decode_png(first["png_bytes"][0]).numpy()
    np.testing.assert_array_equal(decoded, np.round(first["images"][0].numpy() * 255).astype(np.uint8))
    images = first["images"].numpy()
    assert images.min() >= 0.0 and images.max() <= 1.0
    with pytest.raises(tf.errors.InvalidArgumentError, match="digit must be in 0..9"):
        served["sample"](digit=tf.constant([-1], tf.int32), seed=tf.constant([0], tf.int64))
    # The checks must win the race against the op that would fail on the same input (a concat of
    # mismatched batches); one call is a coin toss, so ask repeatedly.
    for _ in range(30):
        with pytest.raises(tf.errors.InvalidArgumentError, match="digit and seed must have the same batch size"):
            served["sample"](digit=tf.constant([1, 2], tf.int32), seed=tf.constant([0], tf.int64))
        with pytest.raises(tf.errors.InvalidArgumentError, match="noise and digit must have the same batch size"):
            served["conditional"](noise=tf.zeros([1, 100]), digit=tf.constant([1, 2], tf.int32))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"noise must have shape \[batch, 100\]"):
            served["serving_default"](noise=tf.zeros([2, 7]))


def test_serving_default_digit_is_uniform_from_noise():
    from export import signatures

    noise = tf.random.stateless_normal([100_000, 4], seed=[1, 2])
    counts = np.bincount(signatures.digit_from_noise(noise).numpy(), minlength=10) / 100_000
    assert np.all(np.abs(counts - 0.1) < 0.005), counts


@pytest.mark.slow
def test_warmup_records_and_metadata(tiny_runs, tmp_path):
    result = _export(tiny_runs["conditional"], tmp_path / "digitgan")
    records = list(tf.data.TFRecordDataset(str(Path(result.path) / "assets.extra" / bundle.WARMUP_FILE)))
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy()) for record in records]
    names = sorted({log.predict_log.request.model_spec.signature_name for log in logs})
    assert names == ["conditional", "sample", "serving_default"] and len(logs) == 3 * len(bundle.WARMUP_BATCH_SIZES)
    assert Path(result.path).stat().st_mode & 0o005 == 0o005, "a server running as another user must read the version"
    assert (Path(result.path) / "assets.extra" / bundle.METADATA_FILE).stat().st_mode & 0o004
    metadata = bundle.read_metadata(result.path)
    assert metadata["step"] == 4 and metadata["version"] == 1 and metadata["tensorflow_version"] == tf.__version__
    assert metadata["train_config"]["conditional"] is True


@pytest.mark.slow
def test_unconditional_model_exports_without_digit(tiny_runs, tmp_path):
    result = _export(tiny_runs["unconditional"], tmp_path / "digitgan")
    assert sorted(result.signatures) == ["sample", "serving_default"]
    assert result.signatures["sample"]["inputs"] == {"seed": "int64 [-1]"}


@pytest.mark.slow
def test_bad_inputs_are_clear_errors_and_leave_nothing(tiny_runs, tmp_path):
    with pytest.raises(bundle.ExportError, match="no checkpoint in run dir"):
        _export(str(tmp_path / "empty-run"), tmp_path / "models")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_runs["unconditional"], mismatched)
    shutil.copy(Path(tiny_runs["conditional"]) / "config.json", mismatched / "config.json")
    with pytest.raises(bundle.ExportError, match="does not hold a generator of this architecture"):
        _export(str(mismatched), tmp_path / "models")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(bundle.ExportError, match="cannot write to"):
        _export(tiny_runs["conditional"], blocker / "digitgan")
    assert not (tmp_path / "models").exists() or _numeric_children(tmp_path / "models") == []


@pytest.mark.slow
def test_blessing_gate_refuses_a_weak_candidate_and_records_figures(tiny_runs, mnist_data_dir, tmp_path):
    """TFX-style blessing: the staged candidate is judged under both shipped judges before the rename;
    each threshold holds against the worse judge's figure; figures land in the metadata."""
    from quality import sources

    base = tmp_path / "digitgan"
    small = sources.EvaluateConfig(per_digit=20, default_samples=200, data_dir=mnist_data_dir)
    strict = sources.blessing_gate(small, min_conditional_accuracy=0.99, max_frechet_ratio=3.0, report=lambda line: None,
                                   progress=False, min_precision=0.9, min_recall=0.9)
    with pytest.raises(bundle.ExportError, match=r"version 1 not published: conditional accuracy .* < 99.00% \(judge \w+\); "
                                                 r"Fréchet ratio .* > 3.00 \(judge \w+\); precision .* < 0.900 .*; "
                                                 r"recall .* < 0.900"):
        _export(tiny_runs["conditional"], base, gate=strict)  # 4 training steps: far from every threshold
    assert _numeric_children(base) == []
    rejected = bundle.read_metadata(base / ".rejected-1")["evaluation"]
    assert rejected["blessed"] is False and rejected["samples"] == 200 and rejected["thresholds"]["max_frechet_ratio"] == 3.0
    judged = {row["judge"]: row for row in rejected["judges"]}
    assert set(judged) == {"small", "wide"} and all(row["calibration"]["judge"] == name for name, row in judged.items())
    # The gate holds each threshold against the worse of the two judges.
    assert rejected["frechet_ratio"] == max(row["frechet_ratio"] for row in judged.values())
    assert rejected["recall"] == min(row["recall"] for row in judged.values())
    worse = max(judged, key=lambda name: judged[name]["frechet_ratio"])
    assert rejected["worse_judge"]["frechet_ratio"] == worse
    lenient = sources.blessing_gate(small, max_frechet_ratio=1e9, report=lambda line: None, progress=False)
    result = _export(tiny_runs["conditional"], base, gate=lenient)
    evaluation = bundle.read_metadata(result.path)["evaluation"]
    assert result.version == 1 and evaluation["blessed"] is True
    assert evaluation["frechet_ratio"] == pytest.approx(rejected["frechet_ratio"])  # same seeds, same candidate
    with pytest.raises(ValueError, match="min_conditional_accuracy must be in"):
        sources.blessing_gate(small, min_conditional_accuracy=99)
    with pytest.raises(ValueError, match="min_recall must be in"):
        sources.blessing_gate(small, min_recall=90)
    needs_digits = sources.blessing_gate(small, min_conditional_accuracy=0.5, report=lambda line: None, progress=False)
    with pytest.raises(bundle.ExportError, match="needs a conditional model; this one is unconditional"):
        _export(tiny_runs["unconditional"], tmp_path / "unconditional", gate=needs_digits)


@pytest.mark.slow
def test_export_writes_the_generator_average(tiny_runs):
    """A run that kept a moving average of G exports that average, not the last step's G."""
    from trainer import models
    from trainer.config import TrainConfig

    checkpoint = bundle.find_checkpoint(tiny_runs["conditional"])
    train_config = TrainConfig.load(tiny_runs["conditional"])
    exported, _ = bundle.restore_generator(checkpoint, train_config)
    by_name = {}
    for name in ("generator_average", "generator"):
        by_name[name] = models.build_generator_of(train_config)
        tf.train.Checkpoint(**{name: by_name[name]}).restore(checkpoint).expect_partial()
    for mine, average, last in zip(exported.weights, by_name["generator_average"].weights, by_name["generator"].weights):
        np.testing.assert_array_equal(mine.numpy(), average.numpy())
    assert any(not np.array_equal(average.numpy(), last.numpy())
               for average, last in zip(by_name["generator_average"].weights, by_name["generator"].weights))


@pytest.mark.slow
def test_a_bundle_computes_in_float32_even_after_a_bfloat16_run_in_the_same_process(tiny_runs):
    import keras

    from trainer.config import TrainConfig

    checkpoint = bundle.find_checkpoint(tiny_runs["conditional"])
    with precision.keras_policy("mixed_bfloat16"):  # what a bf16 training run leaves behind
        generator, _ = bundle.restore_generator(checkpoint, TrainConfig.load(tiny_runs["conditional"]))
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # left as it was
    assert {layer.dtype_policy.compute_dtype for layer in generator.layers if layer.weights} == {"float32"}
