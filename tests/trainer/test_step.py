"""The distributed step on 2 logical CPUs: replicas agree, noise differs, losses scale like one device."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mnist_data import acquire
from trainer import data, losses, step as step_lib, strategy as strategy_lib
from trainer.config import TrainConfig

GLOBAL_BATCH = 16


def _two_replicas():
    strategy = strategy_lib.create_strategy(gpus=0, cpu_replicas=2)
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync == 2
    return strategy


def _real_batches(mnist_data_dir, count=4):
    mnist = acquire.load_mnist(mnist_data_dir)
    return mnist.train_images[: GLOBAL_BATCH * count], mnist.train_labels[: GLOBAL_BATCH * count]


def _train_function(strategy, state, config, images, labels):
    """(train, iterator): the run's compiled function and an iterator over the batches, as the loop builds them."""
    dataset_fn = data.epoch_dataset_fn(images, labels, GLOBAL_BATCH, seed=0, epoch=0)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    return step_lib.make_train_function(strategy, state, config, GLOBAL_BATCH), iterator


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["tutorial", "tutorial_cbn"])
def test_two_replica_steps_train_and_keep_replicas_identical(mnist_data_dir, architecture):
    strategy = _two_replicas()
    config = TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2, architecture=architecture)
    state = step_lib.set_globals_and_build_state(config, strategy)
    before = [variable.numpy().copy() for variable in state.generator.trainable_variables]
    train, iterator = _train_function(strategy, state, config, *_real_batches(mnist_data_dir))
    generator_loss, discriminator_loss = (float(value) for value in train(iterator, tf.constant(3)))
    assert np.isfinite(generator_loss) and np.isfinite(discriminator_loss)
    assert int(state.step.numpy()) == 3
    after = [variable.numpy() for variable in state.generator.trainable_variables]
    assert any(not np.allclose(old, new) for old, new in zip(before, after)), "generator weights did not change"
    for variable in state.generator.variables + state.discriminator.variables:
        copies = [value.numpy() for value in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)


@pytest.mark.slow
def test_xla_step_trains_on_one_device_like_the_plain_step(mnist_data_dir):
    """Same seed, same data: the XLA-compiled pass trains, and its first losses match the plain step's
    (float32; the dropout masks differ, as XLA draws its own random numbers, hence the tolerance)."""
    images, labels = _real_batches(mnist_data_dir)
    results = {}
    for xla in (False, True):
        strategy = strategy_lib.create_strategy(gpus=0, cpu_replicas=None)
        config = TrainConfig(batch_size=GLOBAL_BATCH, xla=xla, precision="float32")
        state = step_lib.set_globals_and_build_state(config, strategy)
        before = [variable.numpy().copy() for variable in state.generator.trainable_variables]
        train, iterator = _train_function(strategy, state, config, images, labels)
        results[xla] = [float(value) for value in train(iterator, tf.constant(1))]
        train(iterator, tf.constant(2))
        assert int(state.step.numpy()) == 3
        after = [variable.numpy() for variable in state.generator.trainable_variables]
        assert any(not np.allclose(old, new) for old, new in zip(before, after)), f"xla={xla}: G did not change"
    np.testing.assert_allclose(results[True], results[False], rtol=0.05)


def test_xla_on_two_replicas_is_refused_with_a_clear_error():
    strategy = _two_replicas()
    config = TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2, xla=True)
    state = step_lib.set_globals_and_build_state(config, strategy)
    with pytest.raises(ValueError, match="xla runs on one device only, not on 2 replicas"):
        step_lib.make_train_function(strategy, state, config, GLOBAL_BATCH)


def test_noise_differs_per_replica():
    strategy = _two_replicas()
    state = step_lib.set_globals_and_build_state(TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2), strategy)
    per_replica = strategy.run(tf.function(lambda: state.noise_generator.normal([4, 8])))
    first, second = (value.numpy() for value in strategy.experimental_local_results(per_replica))
    assert not np.allclose(first, second)


@pytest.mark.parametrize("classifier_weight", [0.0, 0.5])
def test_reported_loss_equals_single_device_loss(mnist_data_dir, classifier_weight):
    strategy = _two_replicas()
    # float32 pinned: this checks the distribution arithmetic to float32 tolerance on any CPU.
    config = TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2, classifier_weight=classifier_weight,
                         precision="float32")
    state = step_lib.set_globals_and_build_state(config, strategy)
    images, labels = _real_batches(mnist_data_dir, count=1)
    images = images.astype(np.float32) / 127.5 - 1.0
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((GLOBAL_BATCH, config.latent_dim)).astype(np.float32)
    fake_digits = rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)
    batch = (images, labels.astype(np.int32), noise, fake_digits)

    def replica_losses(images, digits, noise, fake_digits):
        # Inference mode (no dropout) so both computations see exactly the same network.
        return step_lib.compute_losses(state, images, digits, noise, fake_digits, GLOBAL_BATCH, True, training=False,
                                       classifier_weight=classifier_weight)

    distributed = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(batch).batch(GLOBAL_BATCH))))
    per_replica = strategy.run(tf.function(replica_losses), args=distributed)
    reported = [float(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)) for value in per_replica]
    single = [float(value) for value in replica_losses(*(tf.constant(part) for part in batch))]
    np.testing.assert_allclose(reported, single, rtol=1e-5)


def test_losses_divide_by_global_batch():
    logits = tf.constant([[0.3], [-1.2], [2.0], [0.5]])
    mean = float(tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(logits), logits)))
    halves = [float(losses.generator_loss(part, global_batch_size=4)) for part in (logits[:2], logits[2:])]
    np.testing.assert_allclose(sum(halves), mean, rtol=1e-6)


def test_classifier_loss_divides_by_global_batch_and_adds_to_both_losses(mnist_data_dir):
    class_logits = tf.constant([[2.0, 0.1, -1.0], [0.3, 0.2, 0.1], [-2.0, 1.5, 0.0], [0.0, 0.0, 3.0]])
    digits = tf.constant([0, 2, 1, 1])
    mean = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=digits, logits=class_logits)))
    halves = [float(losses.classifier_loss(class_logits[i:i + 2], digits[i:i + 2], 4)) for i in (0, 2)]
    np.testing.assert_allclose(sum(halves), mean, rtol=1e-6)
    # With the head, each loss is the adversarial one plus weight x the classifier's cross-entropy.
    config = TrainConfig(batch_size=4, classifier_weight=2.0)
    state = step_lib.set_globals_and_build_state(config, tf.distribute.get_strategy())
    images, labels = _real_batches(mnist_data_dir, count=1)
    images, labels = tf.constant(images[:4].astype(np.float32) / 127.5 - 1.0), tf.constant(labels[:4].astype(np.int32))
    noise, fake_digits = tf.random.normal([4, config.latent_dim], seed=1), tf.constant([3, 1, 4, 1])
    with_head = step_lib.compute_losses(state, images, labels, noise, fake_digits, 4, True, False, 2.0)
    fakes = state.generator([noise, fake_digits], training=False)
    real_logit, real_classes = state.discriminator([images, labels], training=False)
    fake_logit, fake_classes = state.discriminator([fakes, fake_digits], training=False)
    expected_generator = losses.generator_loss(fake_logit, 4) + 2.0 * losses.classifier_loss(fake_classes, fake_digits, 4)
    expected_discriminator = (losses.discriminator_loss(real_logit, fake_logit, 4)
                              + 2.0 * losses.classifier_loss(real_classes, labels, 4))
    np.testing.assert_allclose([float(value) for value in with_head],
                               [float(expected_generator), float(expected_discriminator)], rtol=1e-5)


def test_unconditional_runs_record_no_classifier_weight():
    assert TrainConfig().classifier_weight > 0  # the default recipe's auxiliary classifier
    assert TrainConfig(conditional=False).classifier_weight == 0.0  # no digit to name: off, and config.json says so
    state = step_lib.set_globals_and_build_state(TrainConfig(conditional=False), tf.distribute.get_strategy())
    assert not isinstance(state.discriminator.output, list)  # one logit, no classifier head


def test_learning_rates_follow_ttur_and_the_linear_decay_schedule(mnist_data_dir):
    config = TrainConfig(batch_size=GLOBAL_BATCH, epochs=2, learning_rate=1e-4, discriminator_learning_rate=4e-4,
                         learning_rate_schedule="linear_decay")
    total = 2 * data.steps_per_epoch(acquire.TRAIN_SIZE, GLOBAL_BATCH)
    schedule = step_lib.learning_rate_schedule(config, 1e-4)
    values = [float(schedule(step)) for step in (0, total // 2, total * 3 // 4, total, total + 10)]
    np.testing.assert_allclose(values, [1e-4, 1e-4, 0.5e-4, 0.0, 0.0], atol=1e-9)
    state = step_lib.set_globals_and_build_state(config, tf.distribute.get_strategy())
    state.generator_optimizer.iterations.assign(total * 3 // 4)  # as a checkpoint restore would
    state.discriminator_optimizer.iterations.assign(total * 3 // 4)
    np.testing.assert_allclose(float(state.generator_optimizer.learning_rate), 0.5e-4, rtol=1e-5)
    np.testing.assert_allclose(float(state.discriminator_optimizer.learning_rate), 2e-4, rtol=1e-5)
    early = step_lib.learning_rate_schedule(dataclasses.replace(config, learning_rate_decay_start=0.0), 1e-4)
    np.testing.assert_allclose([float(early(step)) for step in (0, total // 2)], [1e-4, 0.5e-4], atol=1e-9)
    constant = step_lib.set_globals_and_build_state(TrainConfig(batch_size=GLOBAL_BATCH), tf.distribute.get_strategy())
    # Without discriminator_learning_rate, D learns at G's rate (the default's, at step 0).
    assert float(constant.discriminator_optimizer.learning_rate) == np.float32(TrainConfig().learning_rate)


def test_dropout_masks_differ_per_replica_and_their_seeds_are_checkpointed(tmp_path):
    strategy = _two_replicas()
    config = TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2, discriminator_dropout=0.3)  # the default D has none
    state = step_lib.set_globals_and_build_state(config, strategy)
    dropout = state.discriminator.get_layer("down1_dropout")
    per_replica = strategy.run(tf.function(lambda: dropout(tf.ones([4, 8]), training=True)))
    first, second = (value.numpy() for value in strategy.experimental_local_results(per_replica))
    assert not np.array_equal(first == 0, second == 0)
    saved = {name for name, _ in tf.train.list_variables(state.checkpoint().write(str(tmp_path / "ckpt")))}
    assert sum(name.startswith("seed_states/") for name in saved) == 2  # D's two dropout layers


@pytest.mark.slow
def test_generator_average_follows_its_formula_on_every_replica(mnist_data_dir, tmp_path):
    """average <- d * average + (1 - d) * G after each step, d = min(decay, (1 + step) / (10 + step)),
    written identically to both replicas' copies; the checkpoint holds it and export restores it."""
    strategy = _two_replicas()
    # Every step (the default updates on every 4th; test_levers checks the interval).
    config = TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2, generator_average_decay=0.999,
                         generator_average_interval=1)
    state = step_lib.set_globals_and_build_state(config, strategy)
    initial = [variable.numpy().copy() for variable in state.generator.weights]
    for average, weight in zip(state.generator_average.weights, initial):
        np.testing.assert_array_equal(average.numpy(), weight)  # starts as G
    train, iterator = _train_function(strategy, state, config, *_real_batches(mnist_data_dir, count=1))
    train(iterator, tf.constant(1))
    decay = min(0.999, 2.0 / 11.0)  # the update runs after the step counter reached 1
    moved = 0
    for average, before, after in zip(state.generator_average.weights, initial, state.generator.weights):
        expected = decay * before + (1.0 - decay) * after.numpy()
        copies = [value.numpy() for value in average.value.values]
        np.testing.assert_allclose(copies[0], expected, rtol=1e-5, atol=1e-6, err_msg=average.path)
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=average.path)
        moved += not np.allclose(copies[0], after.numpy())
    assert moved > 0, "the average should lag behind G"
    saved = state.checkpoint().write(str(tmp_path / "ckpt"))
    assert any(name.startswith("generator_average/") for name, _ in tf.train.list_variables(saved))


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="auto is float32 on GPUs")
@pytest.mark.parametrize("cpu_info, expected", [
    ("vendor_id : AuthenticAMD\nflags : fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "mixed_bfloat16"),  # 1.33x
    ("vendor_id : GenuineIntel\nflags : fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "float32"),  # 0.63x
    ("vendor_id : GenuineIntel\nflags : fpu sse avx2 avx512_bf16 amx_bf16 amx_tile", "mixed_bfloat16"),
    ("vendor_id : AuthenticAMD\nflags : fpu sse avx2 avx512f avx512_vnni", "float32"),  # emulated, many times slower
    ("", "float32"),  # no /proc/cpuinfo (macOS)
])
def test_auto_precision_is_bfloat16_only_on_cpus_where_it_measured_faster(cpu_info, expected):
    strategy = tf.distribute.get_strategy()
    assert strategy_lib.resolve_precision("auto", strategy, cpu_info=cpu_info) == expected
    assert strategy_lib.has_bfloat16_instructions(cpu_info) == ("bf16" in cpu_info)  # faster or not
    for explicit in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert strategy_lib.resolve_precision(explicit, strategy, cpu_info=cpu_info) == explicit
