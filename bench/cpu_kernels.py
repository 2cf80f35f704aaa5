"""oneDNN's CPU kernels against TensorFlow's own, side by side in one run: training, judging, generating.

TensorFlow chooses its CPU kernels once per process, from TF_ENABLE_ONEDNN_OPTS, so each setting
is measured in a child process of its own (this module again, with `--child`), the two settings
alternating for `--rounds` rounds so machine noise hits them alike; the best round of each figure
is reported. Every entry point of the project asks for oneDNN (`common/cpu_kernels.py`); this
bench shows what that buys on the machine it runs on. Each child measures:
- train step: the default recipe's compiled step, as `python cli.py train` runs it (precision
  `auto` included), fed by the real MNIST pipeline: ms a step, after a warm-up;
- judge small / judge wide: each shipped judge reading `--images` real test digits, as `evaluate`
  does: seconds;
- generate 64 / generate 1: the pretrained bundle's `serving_default` at a batch of 64 and of 1
  noise vectors, as the server runs it: median ms a call.

Usage: python -m bench.cpu_kernels [--rounds 2] [--steps 100] [--images 10000] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import cpu_kernels, machine, quiet

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"oneDNN": "1", "TensorFlow's own": "0"}  # label -> TF_ENABLE_ONEDNN_OPTS
FIGURES = ("train step (ms)", "judge small (s)", "judge wide (s)", "generate 64 (ms)", "generate 1 (ms)")
GENERATOR_CALLS = 30

if __name__ == "__main__":
    quiet.install()  # before TensorFlow is imported (only the children import it); DIGITGAN_VERBOSE=1 shows its logs


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs both settings once")
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per child")
    parser.add_argument("--images", type=int, default=10000, help="real test digits each judge reads per child")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir with (or for) MNIST")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    for name in ("rounds", "steps", "images"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(arguments, name)}")
    return arguments


def measure(arguments) -> dict:
    """This process's figures (see the module docstring), and whether oneDNN is on in it."""
    import statistics
    import time

    import keras
    import tensorflow as tf

    from bench import train_throughput  # the default step, built and timed as that bench does
    from configs import recipes
    from mnist_data import acquire
    from quality import judge as judge_lib

    mnist = acquire.load_mnist(arguments.data_dir)
    config = recipes.build("default", data_dir=arguments.data_dir)
    train, batches = train_throughput.ours(config, mnist, synthetic=False)
    train_throughput.time_ours(train, batches, config.steps_per_call, config.steps_per_call)  # traces and runs once
    seconds = train_throughput.time_ours(train, batches, arguments.steps, config.steps_per_call)
    figures = {"train step (ms)": seconds / arguments.steps * 1000}
    images = judge_lib.real_images(mnist.test_images[:arguments.images])
    for judge in judge_lib.load_judges():
        judge.read(images[:1000])  # traces
        started = time.perf_counter()
        judge.read(images)
        figures[f"judge {judge.name} (s)"] = time.perf_counter() - started
    generate = tf.saved_model.load(str(ROOT / "pretrained" / "digitgan" / "1")).signatures["serving_default"]
    for batch in (64, 1):
        noise = tf.random.normal([batch, config.latent_dim], seed=0)
        generate(noise=noise)
        calls = []
        for _ in range(GENERATOR_CALLS):
            started = time.perf_counter()
            generate(noise=noise)
            calls.append(time.perf_counter() - started)
        figures[f"generate {batch} (ms)"] = statistics.median(calls) * 1000
    precision = keras.mixed_precision.global_policy().name  # what building the state resolved "auto" to
    return {"onednn": cpu_kernels.in_use() == cpu_kernels.ONEDNN, "precision": precision, "figures": figures}


def run_child(setting: str, arguments) -> dict:
    """One child's measure() with TF_ENABLE_ONEDNN_OPTS set to `setting`."""
    command = [sys.executable, "-m", "bench.cpu_kernels", "--child", "--steps", str(arguments.steps),
               "--images", str(arguments.images)] + (["--data-dir", arguments.data_dir] if arguments.data_dir else [])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, cpu_kernels.ONEDNN_VARIABLE: setting})
    if result.returncode != 0:
        raise SystemExit(f"error: the child with {cpu_kernels.ONEDNN_VARIABLE}={setting} failed:\n"
                         f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        print(json.dumps(measure(arguments)), flush=True)
        return
    best = {label: {} for label in SETTINGS}
    reported = {}
    for round_index in range(arguments.rounds):
        for label, setting in SETTINGS.items():
            child = run_child(setting, arguments)
            reported[label] = child
            for name, value in child["figures"].items():
                best[label][name] = min(best[label].get(name, float("inf")), value)
            print(f"round {round_index + 1}/{arguments.rounds}, {label}: "
                  + ", ".join(f"{name} {value:.2f}" for name, value in child["figures"].items()), flush=True)
    print(f"\nmachine: {machine.cpu_model()}, {os.cpu_count()} CPUs; the default step in "
          f"{reported['oneDNN']['precision']}; best of {arguments.rounds} rounds, lower is better")
    onednn, own = best["oneDNN"], best["TensorFlow's own"]
    print(f"{'':18}{'oneDNN':>10}{'TF own':>10}{'TF own / oneDNN':>17}")
    for name in FIGURES:
        print(f"{name:18}{onednn[name]:10.2f}{own[name]:10.2f}{own[name] / onednn[name]:16.2f}x")
    on = {label: child["onednn"] for label, child in reported.items()}
    print(f"oneDNN on in the children: {on}")
    print(json.dumps({"bench": "cpu_kernels", "machine": machine.cpu_model(), "rounds": arguments.rounds,
                      "onednn_on": on, "best": best}))


if __name__ == "__main__":
    main()
