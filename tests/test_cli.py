"""The CLI end to end: help text, clear errors with exit code 2, train → export → serve → generate."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli

runner = CliRunner()
TEST_DIGIT_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)  # MNIST's test split, digits 0-9

TRAIN_FLAGS = ["--config", "--set", "--run-dir", "--data-dir", "--gpus", "--cpu-replicas", "--resume", "--no-resume",
               "--worker-hosts", "--task-index"]


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_train_help_documents_every_flag_and_every_field_once():
    """`train --help` lists its flags, and every recipe field with its TrainConfig docstring (the one source)."""
    from common import field_docs
    from trainer.config import TrainConfig

    result = runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    output = " ".join(_plain(result.output).split())
    for flag in TRAIN_FLAGS:
        assert flag in output, flag
    docs = field_docs.field_docs(TrainConfig)
    for field in set(docs) - set(cli.TRAIN_FLAG_FIELDS):
        assert f"{field}=" in output and docs[field] in output, field


def test_every_command_has_help():
    for command in ("export", "serve", "generate", "status", "metadata", "evaluate"):
        result = runner.invoke(cli.app, [command, "--help"])
        assert result.exit_code == 0 and "--help" in result.output


def test_train_builds_its_config_from_the_recipe_then_set_then_flags(tmp_path, monkeypatch):
    """--config picks the recipe, each --set changes one field (typed as the field), the directory
    flags come last; the CLI plugs the judge in and the config decides whether it runs."""
    from quality import epochs
    from trainer import loop

    calls = []
    monkeypatch.setattr(loop, "train", lambda config, **keywords: calls.append((config, keywords)) or
                        loop.TrainResult(0, 0, 0.0, 0.0, None))
    result = runner.invoke(cli.app, ["train", "--config", "tutorial", "--run-dir", str(tmp_path), "--set", "epochs=3",
                                     "--set", "generator_average_decay=0.99", "--set", "evaluate_every_epoch=true",
                                     "--set", "discriminator_learning_rate=none", "--cpu-replicas", "2"])
    assert result.exit_code == 0, result.output
    (config, keywords), = calls
    assert (config.architecture, config.batch_size, config.conditional) == ("tutorial", 256, False)  # the recipe
    assert (config.epochs, config.generator_average_decay, config.evaluate_every_epoch) == (3, 0.99, True)
    assert config.discriminator_learning_rate is None and config.cpu_replicas == 2 and config.run_dir == str(tmp_path)
    assert keywords["epoch_judge"] is epochs.EpochQuality
    runner.invoke(cli.app, ["train", "--run-dir", str(tmp_path)])
    assert calls[-1][0] == cli.DEFAULTS.__class__(run_dir=str(tmp_path))  # no --config: the default recipe


def test_more_gpus_than_visible_exits_2_with_the_visible_count(tmp_path):
    """Asks for one GPU more than this machine shows, so it holds with or without GPUs."""
    import tensorflow as tf

    visible = len(tf.config.list_physical_devices("GPU"))
    result = runner.invoke(cli.app, ["train", "--gpus", str(visible + 1), "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{visible} {'is' if visible == 1 else 'are'} visible" in result.output, result.output
    assert f"pass --gpus {visible} " in result.output
    assert not (tmp_path / "checkpoints").exists()


def test_xla_on_two_replicas_exits_2_before_writing_anything(tmp_path):
    result = runner.invoke(cli.app, ["train", "--set", "xla=true", "--cpu-replicas", "2", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "xla runs on one device only, not on 2 replicas" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("arguments, message", [
    (["train", "--set", "batch_size=0"], "batch_size must be at least 1"),
    (["train", "--set", "precision=float8"], "precision must be one of"),
    (["train", "--set", "learning_rate_schedule=cosine"], "learning_rate_schedule must be one of"),
    (["train", "--set", "learning_rate_decay_start=1"], "learning_rate_decay_start must be in"),
    (["train", "--set", "classifier_weight=-1"], "classifier_weight must be 0 or more"),
    (["train", "--set", "epochs=three"], "--set epochs=three: epochs takes a whole number"),
    (["train", "--set", "epoch=3"], "no training field is called 'epoch' (did you mean epochs?)"),
    (["train", "--set", "epochs"], "--set takes FIELD=VALUE"),
    (["train", "--set", "conditional=maybe"], "conditional takes true or false"),
    (["train", "--set", "run_dir=elsewhere"], "give it as --run-dir"),
    (["train", "--config", "fastest"], "unknown recipe 'fastest'; choose from default, previous_default, tanh_default, tutorial"),
    (["export", "--run-dir", "/nonexistent-run"], "no checkpoint in run dir"),
    (["generate", "--digit", "x7"], "--digit takes digits 0-9"),
    (["generate", "--server", "127.0.0.1:1", "--timeout", "2"], "cannot reach digitgan server"),
    (["status", "--server", "127.0.0.1:1"], "cannot reach digitgan server"),
    (["serve", "--rest-port", "-1"], "--rest-port must be 0..65535 (0 turns REST off)"),
    (["serve", "--batching-parameters-file", "serving/deploy/batching.config"],
     "--batching-parameters-file needs --enable-batching"),
    (["serve", "--enable-batching", "--batching-parameters-file", "/nonexistent.config"],
     "cannot read batching_parameters_file '/nonexistent.config'"),
])
def test_bad_input_is_one_line_and_exit_code_2(arguments, message):
    result = runner.invoke(cli.app, arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_serve_refuses_a_batching_file_that_is_not_batching_parameters(tmp_path):
    bad = tmp_path / "batching.config"
    bad.write_text("max_batch_size: 64\n")
    result = runner.invoke(cli.app, ["serve", "--enable-batching", "--batching-parameters-file", str(bad),
                                     "--port", "0"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: Invalid protobuf file") and result.output.count("\n") == 1
    assert "tensorflow.serving.BatchingParameters" in result.output


def test_serve_help_says_rest_port_zero_turns_rest_off():
    result = runner.invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "0 = no REST" in _plain(result.output) and "--batching-parameters-file" in _plain(result.output)


@pytest.mark.slow
def test_export_serve_generate_end_to_end(tiny_runs, mnist_data_dir, tmp_path):
    from serving import config as serve_config, server as server_lib

    base = tmp_path / "models" / "digitgan"
    exported = runner.invoke(cli.app, ["export", "--run-dir", tiny_runs["conditional"], "--model-base-path", str(base)])
    assert exported.exit_code == 0, exported.output
    assert "version 1" in exported.output and "sample(digit: int32 [-1], seed: int64 [-1])" in exported.output
    server = server_lib.create_server(serve_config.ServeConfig(model_base_path=str(base), port=0, rest_port=0,
                                                               poll_seconds=0.2))
    server.start()
    try:
        assert server.wait_until_ready(timeout=60)
        address = f"127.0.0.1:{server.grpc_port}"
        png = tmp_path / "grid.png"
        result = runner.invoke(cli.app, ["generate", "--digit", "0123456789", "--count", "3", "--seed", "42",
                                         "--server", address, "--out", str(png)])
        assert result.exit_code == 0, result.output
        assert "Wrote 30 image(s) from digitgan version 1" in result.output
        picture = Image.open(io.BytesIO(png.read_bytes()))
        assert picture.format == "PNG" and picture.size[0] < picture.size[1] * 1.0 + 1  # 10 rows of 3
        array = tmp_path / "sevens.npy"
        result = runner.invoke(cli.app, ["generate", "--digit", "7", "--count", "2", "--format", "npy",
                                         "--server", address, "--out", str(array)])
        again = tmp_path / "again.npy"
        runner.invoke(cli.app, ["generate", "--digit", "7", "--count", "2", "--format", "npy",
                                "--server", address, "--out", str(again)])
        images = np.load(array)
        assert images.shape == (2, 28, 28, 1) and 0.0 <= images.min() and images.max() <= 1.0
        np.testing.assert_array_equal(images, np.load(again))  # same seed → same digits
        status = runner.invoke(cli.app, ["status", "--server", address])
        assert "digitgan version 1: AVAILABLE" in status.output
        metadata = runner.invoke(cli.app, ["metadata", "--server", address, "--json"])
        assert '"serving_default"' in metadata.output and '"conditional"' in metadata.output
        missing = runner.invoke(cli.app, ["generate", "--server", address, "--model-name", "nope"])
        assert missing.exit_code == 2 and "not found" in missing.output
        _requests_spread_over_a_server_list(server, base, tmp_path)
        _pictures(address, mnist_data_dir, tmp_path)
        _evaluate_served_model(address, mnist_data_dir, tmp_path)
    finally:
        server.stop(grace=1)


def _pictures(address, mnist_data_dir, tmp_path):
    """An interpolation grid (one row per digit) and real-vs-generated, as PNGs; bad combinations exit 2."""
    walk = tmp_path / "walk.npy"
    result = runner.invoke(cli.app, ["generate", "--digit", "38", "--count", "5", "--interpolate", "--format", "npy",
                                     "--server", address, "--out", str(walk)])
    assert result.exit_code == 0, result.output
    images = np.load(walk)
    assert images.shape == (10, 28, 28, 1)
    assert not np.array_equal(images[0], images[4])  # the walk moves
    compare = tmp_path / "compare.png"
    result = runner.invoke(cli.app, ["generate", "--digit", "0123456789", "--count", "4", "--compare-real",
                                     "--data-dir", mnist_data_dir, "--server", address, "--out", str(compare)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(compare))
    grid = 2 * (10 * 30 + 2)  # 10 rows of 28-pixel digits with 2-pixel padding, PNG scaled 2x
    assert picture.shape[1] > 2 * grid * 4 / 10  # two 4-wide grids of 10 rows, side by side
    assert picture.shape[0] > grid  # a header row above the grids...
    header = picture[:picture.shape[0] - grid]
    half = picture.shape[1] // 2
    assert header[:, :half].max() > 200 and header[:, half:].max() > 200  # ...with a caption over each half (white text)
    refused = runner.invoke(cli.app, ["generate", "--compare-real", "--format", "npy", "--server", address])
    assert refused.exit_code == 2 and "--compare-real" in refused.output


def _evaluate_served_model(address, mnist_data_dir, tmp_path):
    """`evaluate --server` judges what a gRPC client receives under both shipped judges, each judge's
    calibration row first, and writes the sheets of least real-looking digits and of the real ones missed."""
    import json

    sheet, missed_sheet = tmp_path / "least_real.png", tmp_path / "missed_real.png"
    result = runner.invoke(cli.app, ["evaluate", "--server", address, "--per-digit", "20", "--default-samples", "200",
                                     "--data-dir", mnist_data_dir, "--json", "--sheet", str(sheet),
                                     "--missed-sheet", str(missed_sheet)])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout[result.stdout.index("["):])
    assert [report["judge"] for report in reports] == ["small", "small", "wide", "wide"]
    for calibration, row in zip(reports[::2], reports[1::2]):
        assert calibration["source"].startswith("real test split") and calibration["conditional_accuracy"] >= 0.99
        assert row["source"] == f"digitgan v1 on {address}" and row["samples"] == 200
        assert 0.0 <= row["conditional_accuracy"] <= 1.0 and len(row["per_digit_accuracy"]) == 10
        assert sum(row["coverage"]) == pytest.approx(1.0) and row["frechet_ratio"] > 1.0  # 4 training steps: far from real
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0 and len(row["per_digit_frechet_ratio"]) == 10
        assert len(row["per_digit_precision"]) == len(row["per_digit_recall"]) == 10
        assert row["recall"] == pytest.approx(sum(share * count for share, count in  # each digit in its test share
                                                  zip(row["per_digit_recall"], TEST_DIGIT_COUNTS)) / 10_000)
    assert Image.open(sheet).format == "PNG" and Image.open(missed_sheet).format == "PNG"
    assert str(missed_sheet) in result.stderr
    both = runner.invoke(cli.app, ["evaluate", "--server", address, "--run-dir", "runs/x"])
    assert both.exit_code == 2 and "exactly one of" in both.output


def _requests_spread_over_a_server_list(first, base, tmp_path):
    """`--server a,b` shares one generate's requests between both servers and skips a dead one."""
    from serving import config as serve_config, server as server_lib

    second = server_lib.create_server(serve_config.ServeConfig(model_base_path=str(base), port=0, rest_port=0))
    second.start()
    try:
        assert second.wait_until_ready(timeout=60)
        servers = f"127.0.0.1:1,127.0.0.1:{first.grpc_port},127.0.0.1:{second.grpc_port}"  # the first is down
        before = [_ok_predicts(first), _ok_predicts(second)]
        result = runner.invoke(cli.app, ["generate", "--digit", "0123456789", "--count", "1", "--server", servers,
                                         "--out", str(tmp_path / "spread.png")])
        assert result.exit_code == 0, result.output
        served = [_ok_predicts(first) - before[0], _ok_predicts(second) - before[1]]
        assert sum(served) == 10 and min(served) >= 3, served
    finally:
        second.stop(grace=1)


def _ok_predicts(server) -> int:
    text = server.metrics.render()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith(":tensorflow:serving:request_count{") and 'status="OK"' in line)
