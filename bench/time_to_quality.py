"""Quality against training wall time, side by side: our default recipe vs the TensorFlow DCGAN tutorial's.

Both recipes train on this machine under the same wall-clock budget, in legs of `--leg-seconds`
(each leg resumes the run exactly where the last one stopped). After each leg the newest checkpoint
is judged through the exported signatures (`quality.sources.evaluate_run`): MNIST score, Fréchet
ratio (1.0 = as close as real train is to real test), conditional accuracy and coverage. The budget
counts the training loop's seconds as `TrainResult.seconds` reports them: step calls plus what the
loop does between them (checkpoints, sample grids, the default's per-epoch judging, and the
tf.function tracing each leg repeats);
data preparation, model building and judging are excluded.

The recipes are configs/recipes.py's, as `python cli.py train --config NAME` trains them, except:
- default: with this bench's `--set FIELD=VALUE` settings, if any;
- previous_default: in the precision the old `--precision auto` rule chose
  (`previous_auto_precision`), which on some CPUs is the slower one, so the time against it can be
  measured again;
- previous_default_auto (this bench's own): the same fields under today's `--precision auto`, to
  show the recipe's share of the gain apart from the precision's (the same run where both choose alike);
- tutorial: as many epochs as the budget allows.

Each recipe trains and is judged in a process of its own (this module again, with `--only-recipe`),
as `python cli.py train` runs it, so a recipe's speed cannot depend on what an earlier recipe left
in the process (threads, allocator, compiled functions; docs/experiments.md has the run that showed it).

Usage:
    python -m bench.time_to_quality                       # 600 s of training each, judged every 150 s
    python -m bench.time_to_quality --recipes tanh_default,default --budget 3600 --leg-seconds 3600
                                  # both to their last epoch, judged once at the end: the time ratio
                                  # (also previous_default, and previous_default_auto for its recipe's share alone)
    python -m bench.time_to_quality --recipes default --set classifier_weight=1 --set epochs=8  # a variant
    python -m bench.time_to_quality --budget 60 --leg-seconds 30 --per-digit 50 --default-samples 500  # smoke
Rounds run one recipe after the other; keep the machine otherwise idle, or the times mean little.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cpu_kernels, quiet

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    quiet.install()  # before TensorFlow is imported; DIGITGAN_VERBOSE=1 shows its logs
    cpu_kernels.use_onednn()  # likewise before TensorFlow: the kernels `cli.py` runs with
    # On a GPU, each process takes memory as it needs it, so this parent (which loads MNIST and
    # judges) leaves the GPU to the recipe's own process while that trains.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

import tensorflow as tf  # noqa: E402

from common import machine  # noqa: E402
from configs import recipes  # noqa: E402
from mnist_data import acquire  # noqa: E402
from quality import epochs, judge as judge_lib, sources  # noqa: E402
from trainer import loop, strategy as strategy_lib  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402

INTERRUPTED = 130  # the exit code of a recipe process, and of this script, stopped by Ctrl-C or SIGTERM
BUDGET_EPOCHS = 1000  # the tutorial's epochs here: as many as the budget allows


def recipe_names() -> tuple[str, ...]:
    return (*recipes.names(), "previous_default_auto")


def recipe_fields(name: str, settings: dict) -> dict:
    """The TrainConfig fields recipe `name` trains with in this bench (the module docstring's list);
    `settings` (from `--set`) apply to the default recipe."""
    if name == "previous_default_auto":
        return recipes.overrides("previous_default")
    fields = recipes.overrides(name)
    if name == "default":
        fields.update(settings)
    elif name == "previous_default":
        fields["precision"] = previous_auto_precision()
    elif name == "tutorial":
        fields["epochs"] = BUDGET_EPOCHS
    return fields


def previous_auto_precision() -> str:
    """What the old `--precision auto` rule chose: mixed_bfloat16 on a CPU-only run whenever the CPU has
    AVX512-BF16 or AMX, faster or not (today's rule is `trainer.strategy.bfloat16_is_faster`)."""
    on_gpus = strategy_lib.runs_on_gpus(tf.distribute.get_strategy())
    return "mixed_bfloat16" if strategy_lib.has_bfloat16_instructions() and not on_gpus else "float32"


def images_per_second_guess(config: TrainConfig) -> float:
    """A first guess of the step rate, refined after every leg from what the loop measured."""
    return 600.0 * (1.0 if config.conditional else 1.1)


def evaluate_config(arguments) -> sources.EvaluateConfig:
    return sources.EvaluateConfig(per_digit=arguments.per_digit, default_samples=arguments.default_samples,
                                  data_dir=arguments.data_dir, judge_dirs=tuple(arguments.judge))


def run_recipe(name: str, fields: dict, arguments, run_root: Path) -> list[tuple[float, judge_lib.QualityReport]]:
    """Trains `name` in legs until the budget is spent; returns (training seconds, figures) after each leg."""
    config = TrainConfig(run_dir=str(run_root / name), data_dir=arguments.data_dir, **fields)
    rate, spent, step, rows = images_per_second_guess(config), 0.0, 0, []
    while spent < arguments.budget - 1:
        leg = min(arguments.leg_seconds, arguments.budget - spent)
        target = step + max(1, int(leg * rate / config.batch_size))
        result = loop.train(dataclasses.replace(config, max_steps=target), report=lambda line: None, progress=False,
                            epoch_judge=epochs.EpochQuality)  # as `cli.py train` plugs it in
        if result.interrupted_by is not None:  # Ctrl-C or SIGTERM: the loop saved a checkpoint; the parent says so
            raise SystemExit(INTERRUPTED)
        if result.step == step:  # the run's epochs ended before the budget did
            break
        spent += result.seconds
        if result.seconds > 0:  # refine the step rate from what this leg measured
            rate = (result.step - step) * config.batch_size / result.seconds
        step = result.step
        evaluation = sources.evaluate_run(config.run_dir, None, evaluate_config(arguments), report=lambda line: None,
                                          progress=False)
        for row in evaluation.rows:  # one row per judge
            rows.append((spent, dataclasses.replace(row, source=f"{name} after {spent:.0f} s (step {result.step})")))
            print(f"judge {row.judge}: " + judge_lib.format_reports([rows[-1][1]]).splitlines()[-1], flush=True)
    return rows


def recipe_in_own_process(name: str, run_root: Path) -> tuple[list[tuple[float, judge_lib.QualityReport]],
                                                             list[judge_lib.QualityReport]]:
    """Runs this module again for recipe `name` alone; returns its rows and the judges' calibration rows
    (read back from JSON files).

    The child runs in this process's folder, with the repository on its module path, so the
    user's relative paths (--data-dir, --judge) mean the same to it.
    """
    run_root = run_root.resolve()
    rows_file = run_root / f"{name}.rows.json"
    command = [sys.executable, "-m", "bench.time_to_quality", *sys.argv[1:],
               "--only-recipe", name, "--rows-out", str(rows_file), "--run-root", str(run_root)]
    module_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": module_path})
    try:
        returncode = process.wait()
        if returncode == INTERRUPTED:  # the child can end before this process handles its own copy of the Ctrl-C
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # the child got the same Ctrl-C (one process group): let it save its checkpoint
        try:
            process.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            process.kill()
        print(f"interrupted during recipe {name}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    if returncode != 0:
        raise SystemExit(f"recipe {name} failed (exit code {returncode}); its output is above")
    rows = [(seconds, judge_lib.QualityReport.from_dict(row)) for seconds, row in json.loads(rows_file.read_text())]
    calibrations = json.loads(calibrations_file(rows_file).read_text())
    return rows, [judge_lib.QualityReport.from_dict(row) for row in calibrations]


def calibrations_file(rows_file: Path) -> Path:
    """Where a recipe's process hands back the judges' calibration rows, beside its rows."""
    return rows_file.with_name(rows_file.name.replace(".rows.json", ".calibrations.json"))


def child_main(arguments) -> None:
    """`--only-recipe NAME`: trains and judges one recipe in this process, writes its rows to `--rows-out`."""
    fields = recipe_fields(arguments.only_recipe, arguments.settings)
    rows = run_recipe(arguments.only_recipe, fields, arguments, Path(arguments.run_root))
    Path(arguments.rows_out).write_text(json.dumps([(seconds, row.to_dict()) for seconds, row in rows]))
    # The calibration rows this process's judging already computed (after training: no judge is
    # resident in the process while it trains); the parent prints them above the recipes' rows.
    calibrations = sources.calibration_rows(evaluate_config(arguments),
                                            acquire.load_mnist(arguments.data_dir, report=lambda line: None))
    calibrations_file(Path(arguments.rows_out)).write_text(json.dumps([row.to_dict() for row in calibrations]))


def parse_arguments() -> argparse.Namespace:
    """The command line, checked; `settings` holds --set's fields, read by `recipes.parse_settings`."""
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per recipe")
    parser.add_argument("--leg-seconds", type=float, default=150.0, help="training seconds between judgements")
    parser.add_argument("--per-digit", type=int, default=1000)
    parser.add_argument("--default-samples", type=int, default=10_000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--judge", action="append", default=[],
                        help="a judge folder from `cli.py train-judge`; repeatable [default: both shipped judges]")
    parser.add_argument("--recipes", default="default,tutorial")
    parser.add_argument("--run-root", default=None,
                        help="keep the runs in this folder (one subfolder per recipe) [default: a temporary folder]")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a TrainConfig field of the default recipe (repeatable), e.g. epochs=8")
    parser.add_argument("--only-recipe", default=None, help=argparse.SUPPRESS)  # set for the per-recipe processes
    parser.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    try:
        arguments.settings = recipes.parse_settings(arguments.set)
    except ValueError as error:
        parser.error(str(error))  # exit code 2, with the usage
    unknown = sorted(set(arguments.recipes.split(",")) - set(recipe_names()))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {sorted(recipe_names())}")
    if arguments.only_recipe:
        return arguments
    given_root = Path(arguments.run_root) if arguments.run_root else None
    if given_root is not None and given_root.exists() and (not given_root.is_dir() or any(given_root.iterdir())):
        # A recipe's folder with checkpoints in it would resume from them and time only the rest.
        parser.error(f"--run-root {arguments.run_root} is not empty (or not a folder); give a new or empty folder")
    for folder in arguments.judge:  # found now, not after the first recipe's training
        if not Path(folder).is_dir():
            parser.error(f"--judge {folder} is not a folder; give one written by `cli.py train-judge`")
    return arguments


def print_setup(arguments) -> None:
    """The machine, the budget, the default recipe's overrides and each recipe's precision."""
    print(f"machine: {machine.cpu_model()}, {os.cpu_count()} CPU(s); "
          f"budget {arguments.budget:.0f} s per recipe, judged every {arguments.leg_seconds:.0f} s; "
          f"default recipe overrides: {arguments.settings or 'none'}", flush=True)
    today = strategy_lib.resolve_precision("auto", tf.distribute.get_strategy())
    chosen = {name: recipe_fields(name, arguments.settings).get("precision", "auto")
              for name in arguments.recipes.split(",")}
    print("precision: " + ", ".join(f"{name} {today + ' (auto)' if precision == 'auto' else precision}"
                                    for name, precision in chosen.items()), flush=True)


def run_recipes(arguments) -> tuple[dict[str, list[tuple[float, judge_lib.QualityReport]]],
                                    list[judge_lib.QualityReport]]:
    """Each recipe in a process of its own, one after the other: (name -> its rows, the judges'
    calibration rows, which every recipe's process computes alike; the last one's are kept)."""
    results, calibrations = {}, []
    with tempfile.TemporaryDirectory(prefix="digitgan-time-to-quality-") as folder:
        run_root = Path(arguments.run_root) if arguments.run_root else Path(folder)
        run_root.mkdir(parents=True, exist_ok=True)
        for name in arguments.recipes.split(","):
            results[name], calibrations = recipe_in_own_process(name, run_root)
    return results, calibrations


def print_side_by_side(calibrations: list[judge_lib.QualityReport], results: dict) -> None:
    """The last judgement of each recipe under each judge, below the judges' calibration rows; the
    worse judge's figures per recipe; the time ratios."""
    last = {name: [row for seconds, row in rows if seconds == rows[-1][0]] for name, rows in results.items()}
    print("\nside by side (last judgement of each recipe, under each judge):")
    print(judge_lib.format_reports(calibrations + [row for rows in last.values() for row in rows]))
    for name, rows in last.items():
        print(f"{name}, {sources.format_worst(rows)}")
    if "default" not in results:
        return
    new = results["default"][-1][0]
    for former, rows in results.items():  # every recipe that trains its own epochs (the tutorial's fill the budget)
        if former not in ("default", "tutorial"):
            print(f"training seconds: default {new:.0f} s, {former} {rows[-1][0]:.0f} s: {new / rows[-1][0]:.2f}x")


def print_json(arguments, calibrations: list[judge_lib.QualityReport], results: dict) -> None:
    """The same figures as one JSON line, for scripts: every judgement of every recipe."""
    print(json.dumps({"bench": "time_to_quality", "machine": machine.cpu_model(), "budget_seconds": arguments.budget,
                      "calibrations": [calibration.to_dict() for calibration in calibrations],
                      "recipes": {name: [dict(row.to_dict(), training_seconds=round(seconds, 1)) for seconds, row in rows]
                                  for name, rows in results.items()}}))


def main() -> None:
    arguments = parse_arguments()
    if arguments.only_recipe:
        return child_main(arguments)
    print_setup(arguments)
    # Prepared here, so no recipe's clock includes downloading or converting MNIST.
    acquire.load_mnist(arguments.data_dir, report=print)
    results, calibrations = run_recipes(arguments)
    print_side_by_side(calibrations, results)
    print_json(arguments, calibrations, results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while preparing data or judging: one line, no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
