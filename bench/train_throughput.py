"""Training throughput, side by side in one run: our compiled step vs the TensorFlow DCGAN tutorial's.

Variants (same machine, same process, same global batch; images/s, higher is better):
- tutorial_tf_function: the tutorial's generator/discriminator and its `@tf.function train_step`,
  one Python call per step, Keras BCE losses, Adam(1e-4) (tensorflow.org/tutorials/generative/dcgan);
- tutorial_tf_function_tfdata: the same compiled step fed as the tutorial feeds it, by
  `Dataset.from_tensor_slices(images).shuffle(60000).batch(256)` iterated in Python;
- tutorial_tf_function_xla: the same step compiled by XLA (`tf.function(jit_compile=True)`);
- tutorial_eager: the same step without `tf.function` (the seed's eager loop);
- ours_unconditional / ours_conditional: `trainer.step.make_train_function` (`steps_per_call` steps
  per call) fed by the real MNIST pipeline; ours_conditional is the default recipe on the tutorial architecture in `--precision`;
- ours_conditional_synthetic: the same step fed by one in-memory batch repeated, to show whether
  the input pipeline starves the step;
- ours_compact: ours_conditional with `--architecture compact` (4x4 kernels, narrower G);
- ours_default: the step of `python cli.py train` with every default, `--precision auto` included
  (as `trainer.strategy.resolve_precision` chooses), at the same global batch;
- ours_default_xla: ours_default with `--xla` (its forward and backward pass compiled by XLA);
- ours_default_float32 / ours_default_mixed_bfloat16 (only on CPUs with AVX512-BF16 or AMX): the
  default step in each precision, to show what `auto` chose from (on such CPUs bfloat16 is not
  always the faster: docs/experiments.md);
- tutorial_tf_function_bf16 (only on CPUs with AVX512-BF16 or AMX): the tutorial's step with
  its models built under mixed_bfloat16, to show what precision alone gives.
All "ours" variants include the update of the generator's moving average (part of the default step).

Then the kernel bound: forward + backward (input and kernel gradients) of the tutorial
architecture's three largest convolutions at the same batch, alone, in float32 and (where native)
mixed_bfloat16, with the nominal GFLOP/s each reaches. A step runs each of them at least once (D's
twice), so their time in the faster precision is a floor under any step on this architecture: when
it is above half the tutorial's step, no faster step reaches 2x; only less arithmetic can.

Usage: python -m bench.train_throughput [--batch-size 256] [--steps 10] [--rounds 2] [--precision float32]
Rounds alternate the variants so machine noise hits them alike; the best round of each is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import typing

from common import cpu_kernels, quiet

if __name__ == "__main__":
    quiet.install()  # before TensorFlow is imported; DIGITGAN_VERBOSE=1 shows its logs
    cpu_kernels.use_onednn()  # likewise before TensorFlow: the kernels `cli.py` runs with

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common import machine, precision  # noqa: E402
from configs import recipes  # noqa: E402
from mnist_data import acquire  # noqa: E402
from trainer import data, step as step_lib, strategy as strategy_lib  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402


def tutorial_models():
    """The tutorial's models, verbatim in structure (Sequential, default LeakyReLU, Dropout 0.3)."""
    layers = keras.layers
    generator = keras.Sequential([
        keras.Input((100,)), layers.Dense(7 * 7 * 256, use_bias=False), layers.BatchNormalization(), layers.LeakyReLU(),
        layers.Reshape((7, 7, 256)),
        layers.Conv2DTranspose(128, 5, strides=1, padding="same", use_bias=False), layers.BatchNormalization(), layers.LeakyReLU(),
        layers.Conv2DTranspose(64, 5, strides=2, padding="same", use_bias=False), layers.BatchNormalization(), layers.LeakyReLU(),
        layers.Conv2DTranspose(1, 5, strides=2, padding="same", use_bias=False, activation="tanh")])
    discriminator = keras.Sequential([
        keras.Input((28, 28, 1)), layers.Conv2D(64, 5, strides=2, padding="same"), layers.LeakyReLU(), layers.Dropout(0.3),
        layers.Conv2D(128, 5, strides=2, padding="same"), layers.LeakyReLU(), layers.Dropout(0.3),
        layers.Flatten(), layers.Dense(1)])
    return generator, discriminator


def tutorial_step(batch_size: int, compiled: bool, jit_compile: bool = False):
    """The tutorial's train_step over its own models (XLA-compiled with `jit_compile`); returns
    (step function, its argument)."""
    generator, discriminator = tutorial_models()
    cross_entropy = keras.losses.BinaryCrossentropy(from_logits=True)
    generator_optimizer, discriminator_optimizer = keras.optimizers.Adam(1e-4), keras.optimizers.Adam(1e-4)

    def train_step(images):
        noise = tf.random.normal([batch_size, 100])
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated_images = generator(noise, training=True)
            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated_images, training=True)
            gen_loss = cross_entropy(tf.ones_like(fake_output), fake_output)
            disc_loss = (cross_entropy(tf.ones_like(real_output), real_output)
                         + cross_entropy(tf.zeros_like(fake_output), fake_output))
        generator_optimizer.apply_gradients(zip(gen_tape.gradient(gen_loss, generator.trainable_variables),
                                                generator.trainable_variables))
        discriminator_optimizer.apply_gradients(zip(disc_tape.gradient(disc_loss, discriminator.trainable_variables),
                                                    discriminator.trainable_variables))
        return gen_loss, disc_loss

    # jit_compile=None, not False: False would also switch off TensorFlow's default auto-clustering.
    return (tf.function(train_step, jit_compile=jit_compile or None) if compiled else train_step), None


def tutorial_bfloat16_step(batch_size: int):
    """The tutorial's compiled step with its models built under mixed_bfloat16 (precision alone)."""
    with precision.keras_policy("mixed_bfloat16"):
        return tutorial_step(batch_size, compiled=True)[0]


class Convolution(typing.NamedTuple):
    """One of the tutorial architecture's largest convolutions, as a step runs it."""

    what: str
    make_layer: typing.Callable[[str], keras.layers.Layer]  # dtype policy name -> a fresh layer
    input_shape: tuple[int, int, int]  # one image: height, width, channels
    multiply_adds: int  # per image, forward pass, counted dense (zero-padding taps included)
    runs_per_step: int  # forward + backward passes of it in one training step, at least


# A transposed convolution's cost counts its input pixels, a strided convolution's its output
# pixels. D runs on the real and the generated batch, so its convolution runs twice a step (and its
# input gradient a third time, for G's loss: left out, so the sum is a lower bound).
LARGEST_CONVOLUTIONS = (
    Convolution("G transposed conv 256->128 on 7x7, stride 1",
                lambda dtype: keras.layers.Conv2DTranspose(128, 5, 1, "same", use_bias=False, dtype=dtype),
                (7, 7, 256), 7 * 7 * 256 * 128 * 25, 1),
    Convolution("G transposed conv 128->64, 7x7 to 14x14",
                lambda dtype: keras.layers.Conv2DTranspose(64, 5, 2, "same", use_bias=False, dtype=dtype),
                (7, 7, 128), 7 * 7 * 128 * 64 * 25, 1),
    Convolution("D conv 64->128, 14x14 to 7x7 (x2 a step)",
                lambda dtype: keras.layers.Conv2D(128, 5, 2, "same", dtype=dtype),
                (14, 14, 64), 7 * 7 * 64 * 128 * 25, 2),
)


def time_convolution(make_layer, input_shape, batch_size: int, precision: str, rounds: int) -> float:
    """Best seconds of one compiled forward + backward (gradients for the input and the kernel).

    The input is float32 noise [batch_size, *input_shape]; the layer casts it to `precision`'s
    compute dtype, as the layer before it would hand it over in a step.
    """
    layer = make_layer(precision)
    inputs = tf.random.normal((batch_size, *input_shape))

    @tf.function
    def forward_backward(images):
        with tf.GradientTape() as tape:
            tape.watch(images)
            # A squared loss, returned: the forward pass must run (a plain sum's gradient skips it).
            loss = tf.reduce_sum(tf.square(tf.cast(layer(images), tf.float32)))
        return loss, tape.gradient(loss, [images] + layer.trainable_variables)

    forward_backward(inputs)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(5):
            loss, gradients = forward_backward(inputs)
        float(loss + tf.reduce_sum(gradients[0]))
        best = min(best, (time.perf_counter() - started) / 5)
    return best


def print_kernel_bound(batch_size: int, precisions: list[str], rounds: int) -> dict[str, float]:
    """The largest convolutions alone, per precision: ms and nominal GFLOP/s (3 passes of 2 FLOPs
    a multiply-add, counted dense: zero-padding taps included, so above what the cores really do).

    Returns, per precision, the seconds a training step spends in them at the least.
    """
    print(f"\nkernel bound: forward + backward of the 3 largest convolutions alone, batch {batch_size}")
    print(f"{'layer':42}" + "".join(f" {p + ' ms':>18} {'GFLOP/s':>8}" for p in precisions))
    per_step = {precision: 0.0 for precision in precisions}
    for convolution in LARGEST_CONVOLUTIONS:
        row = f"{convolution.what:42}"
        for precision in precisions:
            seconds = time_convolution(convolution.make_layer, convolution.input_shape, batch_size, precision, rounds)
            per_step[precision] += convolution.runs_per_step * seconds
            row += f" {seconds * 1000:18.1f} {3 * 2 * convolution.multiply_adds * batch_size / seconds / 1e9:8.0f}"
        print(row)
    print(f"{'a step runs at least':42}" + "".join(f" {per_step[p] * 1000:18.1f} {'':8}" for p in precisions))
    if len(precisions) == 2:
        print(f"{precisions[1]} / {precisions[0]} speed of these convolutions: "
              f"{per_step[precisions[0]] / per_step[precisions[1]]:.2f}x")
    return per_step


def time_tutorial(step, images, steps: int) -> float:
    batches = [tf.constant(images[i % len(images)]) for i in range(steps)]
    started = time.perf_counter()
    for batch in batches:
        losses = step(batch)
    float(losses[0])
    return time.perf_counter() - started


def time_tutorial_tfdata(step, iterator, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        losses = step(next(iterator))
    float(losses[0])
    return time.perf_counter() - started


def ours(config: TrainConfig, mnist, synthetic: bool):
    """Our default-strategy state and compiled function plus an iterator over real or synthetic batches."""
    strategy = strategy_lib.create_strategy(config.gpus, config.cpu_replicas)
    state = step_lib.set_globals_and_build_state(config, strategy)
    train = step_lib.make_train_function(strategy, state, config, config.batch_size)
    if synthetic:
        first = (tf.constant(mnist.train_images[:config.batch_size]),
                 tf.constant(mnist.train_labels[:config.batch_size], tf.int32))
        dataset_fn = lambda context: tf.data.Dataset.from_tensors(first).repeat()  # noqa: E731
    else:
        dataset_fn = data.epoch_dataset_fn(mnist.train_images, mnist.train_labels, config.batch_size, 0, 0)
    return train, iter(strategy.distribute_datasets_from_function(dataset_fn))


def time_ours(train, iterator, steps: int, steps_per_call: int) -> float:
    started = time.perf_counter()
    done = 0
    while done < steps:
        count = min(steps_per_call, steps - done)
        losses = train(iterator, tf.constant(count, tf.int32))
        done += count
    float(losses[0])
    return time.perf_counter() - started


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir with (or for) MNIST")
    parser.add_argument("--skip-eager", action="store_true", help="leave out the slow eager loop")
    return parser.parse_args()


def tutorial_variants(arguments, mnist) -> dict:
    """name -> (kind, runner) for the tutorial's step: compiled, fed by tf.data, XLA, eager."""
    batch = arguments.batch_size
    tutorial_compiled = tutorial_step(batch, compiled=True)[0]
    variants = {"tutorial_tf_function": ("tutorial", tutorial_compiled)}
    tutorial_dataset = tf.data.Dataset.from_tensor_slices(
        (mnist.train_images.astype(np.float32) - 127.5) / 127.5).shuffle(60000).batch(batch).repeat()
    variants["tutorial_tf_function_tfdata"] = ("tutorial_tfdata", (tutorial_compiled, iter(tutorial_dataset)))
    variants["tutorial_tf_function_xla"] = ("tutorial", tutorial_step(batch, compiled=True, jit_compile=True)[0])
    if not arguments.skip_eager:
        variants["tutorial_eager"] = ("tutorial", tutorial_step(batch, compiled=False)[0])
    return variants


def our_variants(arguments, mnist, default_config: TrainConfig, native_bfloat16: bool) -> dict:
    """name -> (kind, runner) for our step: on the tutorial's architecture, compact, and the default's."""
    variants = {}
    # The tutorial's architecture for the side-by-side step comparison; "ours_compact" is the
    # cheaper architecture option at the same batch.
    for name, conditional, synthetic, architecture in (
            ("ours_unconditional", False, False, "tutorial"), ("ours_conditional", True, False, "tutorial"),
            ("ours_conditional_synthetic", True, True, "tutorial"),
            ("ours_compact", True, False, "compact")):
        config = TrainConfig(batch_size=arguments.batch_size, conditional=conditional, precision=arguments.precision,
                             architecture=architecture)
        variants[name] = ("ours", ours(config, mnist, synthetic) + (config.steps_per_call,))
    # The default step exactly as `python cli.py train` runs it (precision "auto" included).
    variants["ours_default"] = ("ours", ours(default_config, mnist, False) + (default_config.steps_per_call,))
    xla_config = dataclasses.replace(default_config, xla=True)
    variants["ours_default_xla"] = ("ours", ours(xla_config, mnist, False) + (xla_config.steps_per_call,))
    # Where the CPU has bfloat16 instructions, both precisions of the default step, to show what "auto" chose from.
    if native_bfloat16:
        for policy in ("float32", "mixed_bfloat16"):
            policy_config = dataclasses.replace(default_config, precision=policy)
            variants[f"ours_default_{policy}"] = ("ours", ours(policy_config, mnist, False) + (policy_config.steps_per_call,))
    return variants


def run_variant(kind: str, runner, tutorial_images, steps: int) -> float:
    """Seconds for `steps` steps of one variant."""
    if kind == "tutorial":
        return time_tutorial(runner, tutorial_images, steps)
    if kind == "tutorial_tfdata":
        return time_tutorial_tfdata(runner[0], runner[1], steps)
    return time_ours(runner[0], runner[1], steps, runner[2])


def best_step_seconds(variants: dict, tutorial_images, arguments) -> dict[str, float]:
    """name -> best seconds a step over the rounds, after a warm-up that traces and runs each variant."""
    for kind, runner in variants.values():
        run_variant(kind, runner, tutorial_images, runner[2] if kind == "ours" else 2)
    best = {name: float("inf") for name in variants}
    for _ in range(arguments.rounds):
        for name, (kind, runner) in variants.items():
            steps = max(2, arguments.steps // 3) if name == "tutorial_eager" else arguments.steps
            best[name] = min(best[name], run_variant(kind, runner, tutorial_images, steps) / steps)
    return best


def print_variants(best: dict[str, float], arguments, default_precision: str, native_bfloat16: bool) -> None:
    """The variants' table and what it is read for: precision, input pipeline gap, bfloat16 alone."""
    batch, baseline = arguments.batch_size, best["tutorial_tf_function"]
    print(f"machine: {machine.cpu_model()}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
          f"batch {batch}, precision {arguments.precision}, best of {arguments.rounds} rounds")
    print(f"{'variant':30} {'ms/step':>9} {'images/s':>9} {'vs tutorial tf.function':>24}")
    for name, seconds in best.items():
        print(f"{name:30} {seconds * 1000:9.0f} {batch / seconds:9.0f} {baseline / seconds:23.2f}x")
    print(f"ours_default is `python cli.py train`'s step: precision auto → {default_precision} here, "
          f"the tutorial's step in {arguments.precision}")
    if native_bfloat16:
        print(f"ours_default in mixed_bfloat16 / in float32: "
              f"{best['ours_default_float32'] / best['ours_default_mixed_bfloat16']:.2f}x "
              f"(above 1 means bfloat16 is faster; auto chose {default_precision})")
    synthetic, real = best["ours_conditional_synthetic"], best["ours_conditional"]
    print(f"input pipeline gap (real / synthetic step time - 1): {real / synthetic - 1:+.1%}")
    if "tutorial_tf_function_bf16" in best:
        print(f"ours_default / tutorial_tf_function_bf16 (both in bfloat16): "
              f"{best['tutorial_tf_function_bf16'] / best['ours_default']:.2f}x")


def print_kernel_verdict(best: dict[str, float], convolutions: dict[str, float], arguments) -> None:
    """Whether 2x the tutorial's step is within reach of the convolutions' floor."""
    # Compare like with like: the tutorial's step and the convolutions in the same precision.
    baseline = best["tutorial_tf_function"]
    tutorial_steps = {arguments.precision: baseline}
    if "tutorial_tf_function_bf16" in best:
        tutorial_steps["mixed_bfloat16"] = best["tutorial_tf_function_bf16"]
    fastest = min((p for p in tutorial_steps if p in convolutions), key=lambda p: convolutions[p], default=None)
    if fastest is not None:
        print(f"2x the tutorial's {arguments.precision} step means {baseline / 2 * 1000:.0f} ms a step; these "
              f"convolutions alone need {convolutions[fastest] * 1000:.0f} ms in {fastest}, and the rest of the "
              f"tutorial's {fastest} step here takes {(tutorial_steps[fastest] - convolutions[fastest]) * 1000:.0f} ms more")
    if "mixed_bfloat16" not in convolutions:
        print("(no native bfloat16 on this CPU: bfloat16 columns and variants left out)")


def print_json(best: dict[str, float], convolutions: dict[str, float], arguments, default_precision: str) -> None:
    """The same figures as one JSON line, for scripts."""
    batch, baseline = arguments.batch_size, best["tutorial_tf_function"]
    print(json.dumps({"bench": "train_throughput", "batch_size": batch, "precision": arguments.precision,
                      "default_precision": default_precision,
                      "variants": {name: {"ms_per_step": round(seconds * 1000, 2), "images_per_s": round(batch / seconds, 1),
                                          "vs_tutorial_tf_function": round(baseline / seconds, 3)}
                                   for name, seconds in best.items()},
                      "kernel_bound_ms_per_step": {p: round(value * 1000, 2) for p, value in convolutions.items()}}))


def main() -> None:
    arguments = parse_arguments()
    batch = arguments.batch_size
    mnist = acquire.load_mnist(arguments.data_dir)
    tutorial_images = (mnist.train_images[: batch * 4].astype(np.float32) / 127.5 - 1.0).reshape(4, batch, 28, 28, 1)
    keras.mixed_precision.set_global_policy(arguments.precision)
    default_config = recipes.build("default", batch_size=batch)
    default_precision = strategy_lib.resolve_precision(default_config.precision, tf.distribute.get_strategy())
    native_bfloat16 = strategy_lib.has_bfloat16_instructions()
    variants = tutorial_variants(arguments, mnist)
    variants.update(our_variants(arguments, mnist, default_config, native_bfloat16))
    if native_bfloat16 and arguments.precision != "mixed_bfloat16":
        variants["tutorial_tf_function_bf16"] = ("tutorial", tutorial_bfloat16_step(batch))
    best = best_step_seconds(variants, tutorial_images, arguments)
    print_variants(best, arguments, default_precision, native_bfloat16)
    precisions = ["float32"] + (["mixed_bfloat16"] if native_bfloat16 else [])
    convolutions = print_kernel_bound(batch, precisions, arguments.rounds)
    print_kernel_verdict(best, convolutions, arguments)
    print_json(best, convolutions, arguments, default_precision)


if __name__ == "__main__":
    main()
