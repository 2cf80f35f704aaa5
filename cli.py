"""digitgan's command line: train → export → serve → generate.

Each command parses its options, builds one config and calls one library function. Libraries are
imported inside the commands, so `python cli.py --help` starts instantly and does no TensorFlow work.
Bad input ends with one clear line on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from common import cpu_kernels, field_docs, quiet  # no TensorFlow at import time
from configs import recipes  # plain data: no TensorFlow
from serving import config as serve_config_lib  # plain dataclasses and constants: no TensorFlow, no grpc
from trainer import config as train_config_lib  # plain dataclasses: no TensorFlow at import time

app = typer.Typer(help="A class-conditional DCGAN on real MNIST: train it, export it for TensorFlow Serving, "
                       "serve it, and ask it for digits over gRPC.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

PRETRAINED_BASE_PATH = Path(__file__).resolve().parent / "pretrained" / "digitgan"  # `serve --pretrained`
JUDGE_HELP = ("A judge written by `train-judge` (its folder); repeatable. Given, these judges replace the two shipped "
              "in quality/judge_weights/ and quality/second_judge_weights/ (whose figures compare across machines).")
DEFAULTS = train_config_lib.TrainConfig()  # where `train` writes and `evaluate` reads a run by default
SERVE_DEFAULTS = serve_config_lib.ServeConfig()  # likewise `serve`'s, and where `export` writes versions
DEFAULT_SERVER = serve_config_lib.SERVER  # what the client commands dial
DEFAULT_MODEL_NAME = serve_config_lib.MODEL_NAME


@app.callback()
def main(verbose: bool = typer.Option(
        False, "--verbose", help=f"Show TensorFlow's own start-up and C++ logs (also: {quiet.VERBOSE_VARIABLE}=1); "
                                 "by default only errors that matter reach the terminal.")) -> None:
    """Runs before every command, before any command imports TensorFlow."""
    cpu_kernels.use_onednn()
    # Only a real program's stderr is filtered; typer's test runner swaps sys.stderr for a buffer.
    if sys.stderr is sys.__stderr__:
        quiet.install(verbose=verbose)
    elif verbose:
        quiet.install(verbose=True)


def fail(message: str) -> typer.Exit:
    """Prints `error: message` on stderr and returns the exit-code-2 exception to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def own_command_line() -> list[str]:
    """[this process's command line] when it runs cli.py (or the `digitgan` script), else [] (e.g. under a test runner)."""
    if Path(sys.argv[0]).name not in ("cli.py", "digitgan"):
        return []
    return [shlex.join(["python", "cli.py", *sys.argv[1:]])]


@contextlib.contextmanager
def user_errors(*error_types: type[BaseException]):
    """Turns the libraries' ValueErrors (and the given types) into one line and exit code 2."""
    try:
        yield
    except (ValueError, *error_types) as error:
        raise fail(str(error)) from None


TRAIN_FIELD_DOCS = field_docs.field_docs(train_config_lib.TrainConfig)  # each field's help, written once
# Fields with a flag of their own (devices and directories); the recipe's fields go through --set.
TRAIN_FLAG_FIELDS = {"run_dir": "--run-dir", "data_dir": "--data-dir", "gpus": "--gpus", "cpu_replicas": "--cpu-replicas",
                     "resume": "--resume/--no-resume"}


def train_fields_epilog() -> str:
    """`train --help`'s list of the fields --set takes, from TrainConfig's own docstrings."""
    lines = ["Fields for --set FIELD=VALUE, shown with the default recipe's value:"]
    for name, default, doc in recipes.describe_fields():
        if name not in TRAIN_FLAG_FIELDS:
            lines.append(f"{name}={default}: {doc}")
    return "\n\n".join(lines)


@app.command(epilog=train_fields_epilog())
def train(
    config_name: str = typer.Option("default", "--config", help=f"Named recipe to start from: {', '.join(recipes.names())} "
                                                                "(configs/recipes.py)."),
    settings: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE",
                                       help="Change one field of the recipe, e.g. --set epochs=3; repeatable (fields below)."),
    run_dir: str = typer.Option(DEFAULTS.run_dir, help=TRAIN_FIELD_DOCS["run_dir"]),
    data_dir: Optional[str] = typer.Option(None, help=TRAIN_FIELD_DOCS["data_dir"]),
    gpus: Optional[int] = typer.Option(None, help=TRAIN_FIELD_DOCS["gpus"]),
    cpu_replicas: Optional[int] = typer.Option(None, help=TRAIN_FIELD_DOCS["cpu_replicas"]),
    resume: bool = typer.Option(True, "--resume/--no-resume", help=TRAIN_FIELD_DOCS["resume"] +
                                " --no-resume refuses to touch a run dir that has a checkpoint."),
    worker_hosts: Optional[str] = typer.Option(None, help="Multi-worker: every worker's host:port, comma-separated, "
                                                          "the same list on each worker (builds TF_CONFIG; worker 0 is the chief)."),
    task_index: Optional[int] = typer.Option(None, help="Multi-worker: this worker's index in --worker-hosts."),
) -> None:
    """Train the GAN on MNIST (MirroredStrategy; MultiWorkerMirroredStrategy with TF_CONFIG or --worker-hosts)."""
    from trainer import strategy as strategy_lib

    with user_errors():
        strategy_lib.set_worker_cluster(worker_hosts, task_index)
        changes = recipes.parse_settings(settings)
        for field in changes.keys() & TRAIN_FLAG_FIELDS.keys():
            raise ValueError(f"--set {field}=...: give it as {TRAIN_FLAG_FIELDS[field]}")
        config = recipes.build(config_name, changes, run_dir=run_dir, data_dir=data_dir, gpus=gpus,
                               cpu_replicas=cpu_replicas, resume=resume)
    from quality import epochs
    from trainer import loop

    with user_errors(loop.NonFiniteLossError):
        # The per-epoch judge is plugged in here, so the trainer never imports quality/ (as export's gate).
        result = loop.train(config, report=typer.echo, epoch_judge=epochs.EpochQuality)
    if result.interrupted_by is not None:
        raise typer.Exit(code=128 + result.interrupted_by)


@app.command("export")
def export_command(
    run_dir: str = typer.Option(DEFAULTS.run_dir, help="The training run to export (its newest checkpoint)."),
    checkpoint: Optional[str] = typer.Option(None, help="A specific checkpoint prefix, e.g. runs/default/checkpoints/ckpt-400."),
    model_base_path: str = typer.Option(SERVE_DEFAULTS.model_base_path, help="Folder holding the numeric version folders (as in `serve`)."),
    model_name: str = typer.Option(SERVE_DEFAULTS.model_name, help="Model name used in the bundle's warmup requests."),
    version: Optional[int] = typer.Option(None, help="Version number to write (default: highest present + 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing version of the same number."),
    min_conditional_accuracy: Optional[float] = typer.Option(
        None, help="Blessing gate: publish only if the MNIST judge reads at least this share of `sample` images "
                   "as the digit asked for (e.g. 0.99)."),
    max_frechet_ratio: Optional[float] = typer.Option(
        None, help="Blessing gate: publish only if the Fréchet distance is at most this multiple of real-vs-real (e.g. 2)."),
    min_precision: Optional[float] = typer.Option(
        None, help="Blessing gate: publish only if at least this share of `sample` images lies on the real digits' "
                   "manifold (k = 5 precision, e.g. 0.9)."),
    min_recall: Optional[float] = typer.Option(
        None, help="Blessing gate: publish only if at least this share of real test digits lies on the generated "
                   "images' manifold (k = 5 recall, e.g. 0.9)."),
    data_dir: Optional[str] = typer.Option(None, help="Blessing gate: TFDS data dir with MNIST."),
    judge_dirs: list[str] = typer.Option([], "--judge", help=JUDGE_HELP),
    record_command: list[str] = typer.Option(
        [], help="A command line that made this bundle (e.g. the `train` command), recorded in its metadata "
                 "before this export command itself; repeatable."),
) -> None:
    """Export the generator as a versioned TensorFlow Serving bundle (<model-base-path>/<version>/)."""
    from export import bundle

    with user_errors():
        config = bundle.ExportConfig(run_dir=run_dir, checkpoint=checkpoint, model_base_path=model_base_path,
                                     model_name=model_name, version=version, overwrite=overwrite,
                                     commands=(*record_command, *own_command_line()))
        gate = None
        if any(line is not None for line in (min_conditional_accuracy, max_frechet_ratio, min_precision, min_recall)):
            from quality import sources

            gate = sources.blessing_gate(sources.EvaluateConfig(data_dir=data_dir, judge_dirs=tuple(judge_dirs)),
                                         min_conditional_accuracy, max_frechet_ratio, report=typer.echo,
                                         min_precision=min_precision, min_recall=min_recall)
        result = bundle.export_bundle(config, gate=gate)
    typer.echo(f"Exported step {result.step} as version {result.version}: {result.path}")
    for name, spec in result.signatures.items():
        inputs = ", ".join(f"{alias}: {kind}" for alias, kind in spec["inputs"].items())
        outputs = ", ".join(f"{alias}: {kind}" for alias, kind in spec["outputs"].items())
        typer.echo(f"  {name}({inputs}) -> {outputs}")


@app.command()
def serve(
    model_base_path: str = typer.Option(SERVE_DEFAULTS.model_base_path, help="Folder holding numeric version folders (TF Serving's --model_base_path)."),
    model_name: str = typer.Option(SERVE_DEFAULTS.model_name, help="Name clients use in ModelSpec.name."),
    model_config_file: Optional[str] = typer.Option(SERVE_DEFAULTS.model_config_file, help="TF Serving ModelServerConfig text file (several models, version policies, labels)."),
    host: str = typer.Option(SERVE_DEFAULTS.host, help="Address to bind; 0.0.0.0 opens the server to the network."),
    port: int = typer.Option(SERVE_DEFAULTS.port, help="gRPC port (0 = pick a free one)."),
    rest_port: int = typer.Option(SERVE_DEFAULTS.rest_port, help="REST port; 0 = no REST, as in tensorflow_model_server's --rest_api_port."),
    poll_seconds: float = typer.Option(SERVE_DEFAULTS.poll_seconds, help="How often to look for new versions."),
    enable_batching: bool = typer.Option(SERVE_DEFAULTS.enable_batching, "--enable-batching", help="Batch concurrent Predict requests on the server."),
    batching_parameters_file: Optional[str] = typer.Option(
        SERVE_DEFAULTS.batching_parameters_file, help="With --enable-batching: TF Serving's text-format BatchingParameters file "
                   "(e.g. serving/deploy/batching.config); fields it leaves out take TF's defaults."),
    max_batch_size: Optional[int] = typer.Option(SERVE_DEFAULTS.max_batch_size, help="Batching: largest batch run at once (default: TF's 1000)."),
    batch_timeout_micros: Optional[int] = typer.Option(SERVE_DEFAULTS.batch_timeout_micros, help="Batching: how long a batch waits to fill (default: TF's 0)."),
    max_enqueued_batches: Optional[int] = typer.Option(
        SERVE_DEFAULTS.max_enqueued_batches, help="Batching: queued batches before requests are turned away with UNAVAILABLE (default: TF's 10)."),
    num_batch_threads: Optional[int] = typer.Option(SERVE_DEFAULTS.num_batch_threads, help="Batching: batches run in parallel (default: TF's, the CPU count)."),
    max_request_elements: int = typer.Option(SERVE_DEFAULTS.max_request_elements, help="Largest total tensor element count a request may declare."),
    max_message_bytes: int = typer.Option(SERVE_DEFAULTS.max_message_bytes, help="Largest gRPC message and REST body, in bytes."),
    max_concurrent_rpcs: int = typer.Option(SERVE_DEFAULTS.max_concurrent_rpcs, help="gRPC calls served at once; more get RESOURCE_EXHAUSTED."),
    max_concurrent_rest_requests: int = typer.Option(SERVE_DEFAULTS.max_concurrent_rest_requests, help="REST inference POSTs served at once; more get HTTP 429."),
    engine: str = typer.Option(SERVE_DEFAULTS.engine, help="builtin (this project's server) or tfserving (exec tensorflow_model_server)."),
    monitoring_config_file: Optional[str] = typer.Option(SERVE_DEFAULTS.monitoring_config_file, help="TF Serving MonitoringConfig text file; Prometheus metrics are served on the REST port only when it has prometheus_config { enable: true } (at its path, default /monitoring/prometheus/metrics)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Serve the pretrained bundle that ships with the project "
                                    "(pretrained/digitgan/, trained by the default recipe) instead of --model-base-path: "
                                    "digits at once, no training and no network."),
    rest_api_enable_cors_support: bool = typer.Option(
        SERVE_DEFAULTS.rest_api_enable_cors_support, "--rest-api-enable-cors-support",
        help="Let web pages on other origins call the REST API: CORS headers on every /v1/ reply, as "
             "tensorflow_model_server's --rest_api_enable_cors_support."),
    allow_version_labels_for_unavailable_models: bool = typer.Option(
        SERVE_DEFAULTS.allow_version_labels_for_unavailable_models, "--allow-version-labels-for-unavailable-models",
        help="Let the config file give a new label to a version that is not AVAILABLE yet; without it every label "
             "must name an AVAILABLE version, so a config with labels is refused at start (as in TF Serving)."),
    enable_signature_method_name_check: bool = typer.Option(
        SERVE_DEFAULTS.enable_signature_method_name_check, "--enable-signature-method-name-check",
        help="Classify, Regress and Predict also check a signature's method_name (off: only its inputs and outputs)."),
    model_config_file_poll_wait_seconds: float = typer.Option(
        SERVE_DEFAULTS.model_config_file_poll_wait_seconds,
        help="Re-read --model-config-file this often and apply it when it changed (0 = read once)."),
    rest_api_timeout_in_ms: int = typer.Option(
        SERVE_DEFAULTS.rest_api_timeout_in_ms, help="A REST request's model run is cut off after this long: HTTP 504 (0 = no limit)."),
    enable_model_warmup: bool = typer.Option(
        SERVE_DEFAULTS.enable_model_warmup, "--enable-model-warmup/--no-enable-model-warmup",
        help="Replay each version's assets.extra/tf_serving_warmup_requests before it serves "
             "(--no-enable-model-warmup is TF's --enable_model_warmup=false)."),
    num_request_iterations_for_warmup: int = typer.Option(
        SERVE_DEFAULTS.num_request_iterations_for_warmup, help="Times each warmup record is replayed (0 = once)."),
    saved_model_tags: str = typer.Option(
        SERVE_DEFAULTS.saved_model_tags, help="Comma-separated tags of the MetaGraph to load from each SavedModel."),
    rest_api_num_threads: Optional[int] = typer.Option(
        SERVE_DEFAULTS.rest_api_num_threads, help="REST requests processed at once; more wait (default: 4 per CPU)."),
    tensorflow_intra_op_parallelism: int = typer.Option(
        SERVE_DEFAULTS.tensorflow_intra_op_parallelism, help="Threads one TensorFlow op may use (0 = TensorFlow's choice)."),
    tensorflow_inter_op_parallelism: int = typer.Option(
        SERVE_DEFAULTS.tensorflow_inter_op_parallelism, help="TensorFlow ops run at once (0 = TensorFlow's choice)."),
    version: bool = typer.Option(False, "--version", help="Print this server's version and TensorFlow's, and exit "
                                 "(with --engine tfserving: tensorflow_model_server's)."),
) -> None:
    """Serve exported bundles over TF Serving's gRPC (and REST) API until Ctrl-C/SIGTERM."""
    if version:
        from serving import version as version_lib

        with user_errors(OSError):
            if engine == "tfserving":
                version_lib.exec_tfserving_version()
        for line in version_lib.version_lines():
            typer.echo(line)
        return
    with user_errors():
        if pretrained:
            model_base_path = pretrained_base_path(model_base_path, model_config_file)
        if rest_port < 0:  # ServeConfig's FREE_PORT is for tests; the CLI follows TF Serving
            raise ValueError(f"--rest-port must be 0..65535 (0 turns REST off), got {rest_port}")
        if batching_parameters_file is not None and not enable_batching:
            raise ValueError("--batching-parameters-file needs --enable-batching (as in tensorflow_model_server)")
        config = serve_config_lib.ServeConfig(
            model_base_path=model_base_path, model_name=model_name, model_config_file=model_config_file, host=host,
            port=port, rest_port=rest_port, poll_seconds=poll_seconds, enable_batching=enable_batching,
            batching_parameters_file=batching_parameters_file, max_batch_size=max_batch_size,
            batch_timeout_micros=batch_timeout_micros,
            max_enqueued_batches=max_enqueued_batches, num_batch_threads=num_batch_threads,
            max_request_elements=max_request_elements, max_message_bytes=max_message_bytes,
            max_concurrent_rpcs=max_concurrent_rpcs, max_concurrent_rest_requests=max_concurrent_rest_requests,
            engine=engine, monitoring_config_file=monitoring_config_file,
            rest_api_enable_cors_support=rest_api_enable_cors_support,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
            enable_signature_method_name_check=enable_signature_method_name_check,
            model_config_file_poll_wait_seconds=model_config_file_poll_wait_seconds,
            rest_api_timeout_in_ms=rest_api_timeout_in_ms, enable_model_warmup=enable_model_warmup,
            num_request_iterations_for_warmup=num_request_iterations_for_warmup, saved_model_tags=saved_model_tags,
            rest_api_num_threads=rest_api_num_threads, tensorflow_intra_op_parallelism=tensorflow_intra_op_parallelism,
            tensorflow_inter_op_parallelism=tensorflow_inter_op_parallelism)
    from serving import server

    with user_errors(OSError):
        raise typer.Exit(code=server.run_server(config))


def pretrained_base_path(model_base_path: str, model_config_file: Optional[str]) -> str:
    """The shipped bundle's base path for `serve --pretrained`; ValueError when it clashes or is missing."""
    if model_config_file is not None or model_base_path != SERVE_DEFAULTS.model_base_path:
        raise ValueError("--pretrained serves the shipped bundle: leave out --model-base-path and --model-config-file")
    if not any(entry.name.isdigit() for entry in PRETRAINED_BASE_PATH.glob("*")):
        raise ValueError(f"no pretrained bundle in {PRETRAINED_BASE_PATH} (it ships in a clone of the repository); "
                         "train and export your own: python cli.py train && python cli.py export")
    return str(PRETRAINED_BASE_PATH)


@app.command()
def evaluate(
    run_dir: Optional[str] = typer.Option(None, help="Judge this run's newest checkpoint (through the export's signatures)."),
    checkpoint: Optional[str] = typer.Option(None, help="Judge a specific checkpoint prefix instead of the newest."),
    server: Optional[str] = typer.Option(None, help="Judge a served model over gRPC, host:port: what clients receive."),
    model_name: str = typer.Option(DEFAULT_MODEL_NAME, help="Model name on the server."),
    version: Optional[int] = typer.Option(None, help="Model version on the server (default: the latest available)."),
    per_digit: int = typer.Option(1000, help="`sample` images judged per digit on average (conditional models); "
                                   "each digit comes in its share of the real test split."),
    default_samples: int = typer.Option(10_000, help="`serving_default` images judged for coverage."),
    seed: int = typer.Option(0, help="First sample seed (and the noise seed)."),
    data_dir: Optional[str] = typer.Option(None, help="TFDS data dir with MNIST."),
    judge_dirs: list[str] = typer.Option([], "--judge", help=JUDGE_HELP),
    sheet: str = typer.Option("least_real.png", help="Write the 64 judged images that look least real (lowest realism "
                                                     "score under the worse judge) here, with their digit and seed; '' for none."),
    missed_sheet: str = typer.Option("missed_real.png", help="Write the 64 real test digits farthest from every "
                                     "generated image (the styles recall misses, under the worse judge) here, with "
                                     "their digit and test-split index; '' for none."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts: judge by judge, the calibration row "
                                                       "then the model's."),
) -> None:
    """Measure quality under both shipped MNIST judges: MNIST score, Fréchet ratio (all digits and per digit),
    precision and recall (all digits and the worst digit), conditional accuracy, coverage; and write two
    sheets: the least real-looking digits and the real styles drawn least."""
    from quality import judge, sources
    from client import grpc_client

    with user_errors(grpc_client.ClientError):
        if (server is None) == (run_dir is None and checkpoint is None):
            raise ValueError("give exactly one of --run-dir/--checkpoint (a training run) or --server (a served model)")
        config = sources.EvaluateConfig(per_digit=per_digit, default_samples=default_samples, seed=seed, data_dir=data_dir,
                                        judge_dirs=tuple(judge_dirs), sheet=sheet or None,
                                        missed_sheet=missed_sheet or None)
        report = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
        if server is not None:
            evaluation = sources.evaluate_server(server, model_name, version, config, report=report)
        else:
            evaluation = sources.evaluate_run(run_dir or DEFAULTS.run_dir, checkpoint, config, report=report)
    if as_json:
        typer.echo(judge.reports_json(evaluation.reports))
    else:
        typer.echo(judge.format_reports(evaluation.reports))
        typer.echo(sources.format_worst(evaluation.rows))
    if evaluation.sheet:
        report(f"The {len(evaluation.sheet.labels)} least real-looking images, with their digit and seed: "
               f"{evaluation.sheet.path}")
    if evaluation.missed_sheet:
        report(f"The {len(evaluation.missed_sheet.labels)} real test digits farthest from every generated one, "
               f"with their digit and index: {evaluation.missed_sheet.path}")


def parse_digits(text: Optional[str]) -> Optional[list[int]]:
    """"7" → [7]; "0123456789" or "0,1,2" → [0, 1, 2, ...]; None stays None."""
    if text is None:
        return None
    characters = [character for character in text if character not in ", "]
    if not characters or not all(character.isdigit() for character in characters):
        raise ValueError(f"--digit takes digits 0-9, like 7 or 0123456789; got {text!r}")
    return [int(character) for character in characters]


@app.command()
def generate(
    digit: Optional[str] = typer.Option(None, help="Digit(s) to draw, e.g. 7 or 0123456789 (default: any, from noise)."),
    count: int = typer.Option(16, help="How many images, by mode: with --digit, images per digit (one row each); without "
                                        "--digit, images in all; with --interpolate, steps of the walk in each row."),
    seed: int = typer.Option(0, help="Seed of the first image; the same seed gives the same image."),
    out: Path = typer.Option(Path("digits.png"), help="Output file."),
    output_format: str = typer.Option("png", "--format", help="png (a grid, one row per digit) or npy (float32 [N,28,28,1] in [0,1])."),
    server: str = typer.Option(DEFAULT_SERVER, help="host:port of the gRPC server; a comma-separated list spreads requests."),
    model_name: str = typer.Option(DEFAULT_MODEL_NAME, help="Model name on the server."),
    version: Optional[int] = typer.Option(None, help="Model version (default: the latest available)."),
    timeout: float = typer.Option(30.0, help="Seconds to wait for the server (one that is still starting is waited for) and for each request."),
    interpolate: bool = typer.Option(False, "--interpolate",
                                     help="Walk from one noise vector to another, one row per digit (see --count)."),
    compare_real: bool = typer.Option(False, "--compare-real",
                                      help="PNG only: real MNIST test images (left) beside the generated ones (right), row by row, "
                                           "under a header that names each half."),
    data_dir: Optional[str] = typer.Option(None, help="--compare-real: TFDS data dir with MNIST."),
) -> None:
    """Ask a served model for digits over gRPC and write them as a PNG grid (or .npy)."""
    from client import grpc_client

    with user_errors(grpc_client.ClientError):
        if output_format not in ("png", "npy"):
            raise ValueError(f"--format must be png or npy, got {output_format!r}")
        if count < 1:
            raise ValueError(f"--count must be at least 1, got {count}")
        if compare_real and (output_format != "png" or interpolate):
            raise ValueError("--compare-real makes a PNG of sampled digits; leave out --format npy and --interpolate")
        digits = parse_digits(digit)
        grpc_client.wait_until_available(server, model_name, version, timeout)  # e.g. right after `serve ... &`
        if interpolate:
            images, served_version = grpc_client.interpolate(server, model_name, digits=digits, steps=count, seed=seed,
                                                        version=version, timeout=timeout)
        else:
            images, served_version = grpc_client.generate(server, model_name, digits=digits, count=count, seed=seed,
                                                     version=version, timeout=timeout)
        columns = count if digits or interpolate else None
        if compare_real:
            _write_real_beside(out, images, digits, count, data_dir, model_name)
        else:
            _write_images(out, images, output_format, columns=columns)
    typer.echo(f"Wrote {len(images)} image(s) from {model_name} version {served_version} to {out}")


def _write_real_beside(out: Path, images, digits: Optional[list[int]], count: int, data_dir: Optional[str],
                       model_name: str) -> None:
    """Real test images of the same digits (or the first ones, without --digit) left of the generated grid,
    under a header naming each half."""
    import numpy as np

    from common import files, images as image_grids
    from mnist_data import acquire

    mnist = acquire.load_mnist(data_dir, report=lambda line: typer.echo(line, err=True))
    if digits:
        fewest = min(int(np.sum(mnist.test_labels == digit)) for digit in digits)
        if count > fewest:
            raise ValueError(f"--compare-real shows real test images: at most {fewest} per digit here, got --count {count}")
        real = np.concatenate([mnist.test_images[mnist.test_labels == digit][:count] for digit in digits])
    else:
        real = mnist.test_images[:len(images)]
    columns = count if digits else None
    left = image_grids.tile(real.astype(np.float32) / 255.0, columns)
    right = image_grids.tile(images, columns)
    picture = image_grids.labelled_side_by_side(left, right, "real (MNIST test)", f"generated ({model_name})")
    files.write_bytes_atomic(out, image_grids.png_bytes(picture, scale=2))


def _write_images(out: Path, images, output_format: str, columns: Optional[int]) -> None:
    import io

    import numpy as np

    from common import files, images as image_grids

    if output_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, images)
        files.write_bytes_atomic(out, buffer.getvalue())
    else:
        image_grids.save_grid(out, images, columns=columns)


@app.command("train-judge")
def train_judge(
    out: Path = typer.Option(..., help="Folder to write the judge to (weights and manifest.json). Pass "
                                       "quality/judge_weights or quality/second_judge_weights to replace a shipped judge on purpose."),
    architecture: str = typer.Option("small", help="small (two convolutions, 128 features: the first shipped judge) or "
                                                   "wide (four convolutions, global average pooling, 256 features: the second)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the initial weights and dropout (default: 0 for small, 1 for wide, "
                                                  "as the shipped judges were trained)."),
    data_dir: Optional[str] = typer.Option(None, help="TFDS data dir for MNIST (default: ~/tensorflow_datasets)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Keep the judge already in --out and recompute only "
                                     "its manifest's calibration figures (after a change to how they are computed)."),
) -> None:
    """Train an MNIST judge (minutes on 2 CPU cores) and write it with its manifest.

    Figures use the shipped judges unless a command is given `--judge FOLDER`; a judge trained here
    is never picked up silently.
    """
    from mnist_data import acquire
    from quality import judge

    with user_errors():
        if architecture not in judge.ARCHITECTURES:
            raise ValueError(f"--architecture must be one of {', '.join(judge.ARCHITECTURES)}, got {architecture!r}")
        seed = judge.DEFAULT_SEEDS[architecture] if seed is None else seed
        if recalibrate:
            judge.load_judge(out)  # refuses a folder without a judge before MNIST is read
        mnist = acquire.load_mnist(data_dir, report=typer.echo)
        command = own_command_line() or [f"python cli.py train-judge --out {out} --architecture {architecture}"
                                               + (" --recalibrate" if recalibrate else "")]
        if recalibrate:
            manifest = judge.recalibrate(out, mnist, command[0])
        else:
            manifest = judge.train_judge(mnist, out, command[0], report=typer.echo, architecture=architecture, seed=seed)
    calibration = manifest["calibration"]
    typer.echo(f"{'Recalibrated' if recalibrate else 'Wrote'} {out / manifest['weights']} ({manifest['bytes']:,} bytes, "
               f"sha256 {manifest['sha256'][:12]}...): "
               f"{manifest['test_accuracy']:.2%} on the real test split; calibration: MNIST score "
               f"{calibration['mnist_score']:.3f}, real train vs real test Fréchet distance "
               f"{calibration['real_train_vs_real_test_frechet']:.3f}, precision {calibration['precision']:.3f}, "
               f"recall {calibration['recall']:.3f}")


@app.command()
def status(
    server: str = typer.Option(DEFAULT_SERVER, help="host:port of the gRPC server."),
    model_name: str = typer.Option(DEFAULT_MODEL_NAME, help="Model name on the server."),
    version: Optional[int] = typer.Option(None, help="One version (default: all known versions)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show the model's versions and their states (GetModelStatus)."""
    from client import grpc_client

    with user_errors(grpc_client.ClientError):
        versions = grpc_client.get_status(server, model_name, version=version)
    if as_json:
        typer.echo(json.dumps(versions, indent=2))
        return
    for entry in versions:
        problem = f"  ({entry['error_code']}: {entry['error_message']})" if entry.get("error_message") else ""
        typer.echo(f"{model_name} version {entry['version']}: {entry['state']}{problem}")
    if version is None:
        typer.echo(served_summary(model_name, versions))


def served_summary(model_name: str, versions: list[dict]) -> str:
    """One line: which version a request without a version gets, and why that one."""
    available = [int(entry["version"]) for entry in versions if entry["state"] == "AVAILABLE"]
    if not available:
        return f"serving: nothing yet (no version of {model_name} is AVAILABLE)"
    served = max(available)
    failed = sorted((int(entry["version"]) for entry in versions
                     if int(entry["version"]) > served and entry.get("error_message")), reverse=True)
    if failed:
        return (f"serving: version {served}, the newest that loaded; newer version(s) {failed} failed "
                f"(see above), so this server serves an older one where tensorflow_model_server would not")
    return f"serving: version {served}, the newest available"


@app.command()
def metadata(
    server: str = typer.Option(DEFAULT_SERVER, help="host:port of the gRPC server."),
    model_name: str = typer.Option(DEFAULT_MODEL_NAME, help="Model name on the server."),
    version: Optional[int] = typer.Option(None, help="Model version (default: the latest available)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show the model's signatures (GetModelMetadata)."""
    from client import grpc_client

    with user_errors(grpc_client.ClientError):
        described = grpc_client.get_metadata(server, model_name, version=version)
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    typer.echo(f"{model_name} version {described['version']}")
    for name, signature in sorted(described["signatures"].items()):
        typer.echo(f"  {name} ({signature.get('method_name', '')})")
        for direction in ("inputs", "outputs"):
            for alias, tensor in sorted(signature[direction].items()):
                typer.echo(f"    {direction[:-1]:6} {alias}: {tensor['dtype']} {tensor['shape']}")


if __name__ == "__main__":
    app()
