"""Quality against training wall time, side by side: our default recipe vs the TensorFlow DCGAN tutorial's.

Both recipes train on this machine under the same wall-clock budget, in legs of `--leg-seconds`
(each leg resumes the run exactly where the last one stopped). After each leg the newest checkpoint
is judged through the exported signatures (`quality.sources.evaluate_run`): MNIST score, Fréchet
ratio (1.0 = as close as real train is to real test), conditional accuracy and coverage. The budget
counts the training loop's seconds as `TrainResult.seconds` reports them: step calls plus what the
loop does between them (checkpoints, sample grids, the default's per-epoch judging, and the
tf.function tracing each leg repeats);
data preparation, model building and judging are excluded.

- default: `TrainConfig()` as `python cli.py train` runs it (class-conditional);
- previous_default: the default recipe until 2026-12-01 (docs/experiments.md, runs #17-#20), every
  recipe field spelled out, so "half the training time of the old default" can be measured again;
- tutorial: the tutorial's recipe on the same architecture: unconditional, batch 256, Adam(1e-4)
  with Keras's default beta_1 0.9 (tensorflow.org/tutorials/generative/dcgan).

Usage:
    python bench/time_to_quality.py                       # 600 s each, judged every 150 s (about 35 min)
    python bench/time_to_quality.py --recipes previous_default,default --budget 1200 --leg-seconds 1200
                                  # both to their last epoch, judged once at the end: the time ratio
    python bench/time_to_quality.py --recipes default --set classifier_weight=1 --set epochs=8  # a variant
    python bench/time_to_quality.py --budget 60 --leg-seconds 30 --per-digit 50 --default-samples 500  # smoke
Rounds run one recipe after the other; keep the machine otherwise idle, or the times mean little.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import quiet  # noqa: E402

if __name__ == "__main__":
    quiet.install()  # before TensorFlow is imported; DIGITGAN_VERBOSE=1 shows its logs

from mnist_data import acquire  # noqa: E402
from quality import epochs, judge as judge_lib, sources  # noqa: E402
from trainer import loop  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402

RECIPES = {
    # Exactly `python cli.py train`: its epochs, its per-epoch judging (inside the budget), precision auto.
    "default": dict(),
    # The default until 2026-12-01: tutorial widths (5x5 kernels) with conditional BatchNorm, batch 64, 8 epochs.
    "previous_default": dict(epochs=8, batch_size=64, learning_rate=2e-4, discriminator_learning_rate=None,
                             learning_rate_schedule="linear_decay", learning_rate_decay_start=0.5, beta_1=0.5,
                             beta_2=0.999, latent_dim=100, conditional=True, classifier_weight=0.15, architecture="tutorial_cbn",
                             generator_average_decay=0.999),
    # As the tutorial trains: float32, no schedule, no moving average, no judging; as many epochs as the budget allows.
    "tutorial": dict(conditional=False, batch_size=256, learning_rate=1e-4, beta_1=0.9, architecture="tutorial",
                     generator_average_decay=0.0, precision="float32", learning_rate_schedule="constant",
                     classifier_weight=0.0, epochs=1000, evaluate_every_epoch=False),
}


def images_per_second_guess(config: TrainConfig) -> float:
    """A first guess of the step rate, refined after every leg from what the loop measured."""
    return 600.0 * (1.0 if config.conditional else 1.1)


def parse_overrides(pairs: list[str]) -> dict:
    """["key=value", ...] → {key: value}; values are read as JSON where they parse (numbers, true, null)."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_recipe(name: str, overrides: dict, arguments, run_root: Path) -> list[tuple[float, judge_lib.QualityReport]]:
    """Trains `name` in legs until the budget is spent; returns (training seconds, figures) after each leg."""
    config = TrainConfig(run_dir=str(run_root / name), data_dir=arguments.data_dir, **overrides)
    evaluate_config = sources.EvaluateConfig(per_digit=arguments.per_digit, default_samples=arguments.default_samples,
                                             data_dir=arguments.data_dir, judge_dir=arguments.judge)
    rate, spent, step, rows = images_per_second_guess(config), 0.0, 0, []
    while spent < arguments.budget - 1:
        leg = min(arguments.leg_seconds, arguments.budget - spent)
        target = step + max(1, int(leg * rate / config.batch_size))
        result = loop.train(dataclasses.replace(config, max_steps=target), report=lambda line: None, progress=False,
                            epoch_judge=epochs.EpochQuality)  # as `cli.py train` plugs it in
        if result.step == step:  # the run's epochs ended before the budget did
            break
        spent += result.seconds
        if result.seconds > 0:  # refine the step rate from what this leg measured
            rate = (result.step - step) * config.batch_size / result.seconds
        step = result.step
        _, row = sources.evaluate_run(config.run_dir, None, evaluate_config, report=lambda line: None,
                                                progress=False)
        rows.append((spent, dataclasses.replace(row, source=f"{name} after {spent:.0f} s (step {result.step})")))
        print(judge_lib.format_reports([rows[-1][1]]).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per recipe")
    parser.add_argument("--leg-seconds", type=float, default=150.0, help="training seconds between judgements")
    parser.add_argument("--per-digit", type=int, default=1000)
    parser.add_argument("--default-samples", type=int, default=10_000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--judge", default=None, help="a judge folder from `cli.py train-judge` [default: the shipped judge]")
    parser.add_argument("--recipes", default="default,tutorial")
    parser.add_argument("--run-root", default=None,
                        help="keep the runs in this folder (one subfolder per recipe) [default: a temporary folder]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field of the default recipe (repeatable), e.g. epochs=8")
    arguments = parser.parse_args()
    RECIPES["default"] = parse_overrides(arguments.set)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
          f"budget {arguments.budget:.0f} s per recipe, judged every {arguments.leg_seconds:.0f} s; "
          f"default recipe overrides: {RECIPES['default'] or 'none'}")
    mnist = acquire.load_mnist(arguments.data_dir, report=print)
    calibration = judge_lib.reference(judge_lib.load_judge(arguments.judge), mnist).calibration
    print(judge_lib.format_reports([calibration]))
    with tempfile.TemporaryDirectory(prefix="digitgan-time-to-quality-") as folder:
        run_root = Path(arguments.run_root or folder)
        results = {name: run_recipe(name, RECIPES[name], arguments, run_root)
                   for name in arguments.recipes.split(",")}
    print("\nside by side (last judgement of each recipe):")
    print(judge_lib.format_reports([calibration] + [rows[-1][1] for rows in results.values()]))
    if "default" in results and "previous_default" in results:
        new, old = results["default"][-1][0], results["previous_default"][-1][0]
        print(f"training seconds: default {new:.0f} s, previous_default {old:.0f} s: {new / old:.2f}x")
    # The same figures as one JSON line, for scripts: every judgement of every recipe.
    print(json.dumps({"bench": "time_to_quality", "budget_seconds": arguments.budget, "calibration": calibration.to_dict(),
                      "recipes": {name: [dict(row.to_dict(), training_seconds=round(seconds, 1)) for seconds, row in rows]
                                  for name, rows in results.items()}}))


if __name__ == "__main__":
    main()
