"""The training levers of issue 22: hinge and relativistic losses, spectral normalisation in D, lazy
R1, minibatch standard deviation, the moving average's ramp-up and interval, the twin auxiliary
classifier, the mode-seeking term, the classifier's confidence cap, top-k training, consistency
regularisation and centring, each off by default except a little mode seeking, the interval and a
little centring; and G's image activation, tanh (the former default) or hard_tanh (the default).

Each is checked for its arithmetic, its config validation, and on 2 logical CPU replicas for
training with replicas kept identical and for resuming exactly.
"""
from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import recipes
from trainer import data, loop, losses, models, step as step_lib, strategy as strategy_lib
from trainer import config as config_lib
from trainer.config import TrainConfig
from tests.trainer.test_faults import assert_same_training

GLOBAL_BATCH = 16
# Every lever on at once. The adversarial losses exclude each other: relativistic here, and the
# 2-replica test below trains under each. tanh is the image activation other than the default.
ALL_LEVERS = dict(loss="relativistic", spectral_norm=True, r1_gamma=1.0, r1_interval=2, minibatch_std=True,
                  generator_average_rampup=0.05, twin_classifier=1.0, mode_seeking=1.0, classifier_confidence=0.9,
                  generator_average_interval=2, image_activation="tanh", generator_top_k=0.5,
                  consistency=1.0, consistency_shift=1, centring=1.0)


def test_config_names_every_loss_the_step_knows():
    assert set(config_lib.LOSSES) == set(losses.ADVERSARIAL_LOSSES)


def test_levers_are_off_by_default_but_a_little_mode_seeking_and_centring():
    config = TrainConfig()
    assert (config.loss, config.spectral_norm, config.r1_gamma, config.minibatch_std,
            config.generator_average_rampup, config.twin_classifier, config.classifier_confidence,
            config.generator_top_k, config.consistency) == (
        "bce", False, 0.0, False, 0.0, 0.0, 0.0, 1.0, 0.0)
    # the default recipe's small weights and its lazier average
    assert (config.mode_seeking, config.generator_average_interval, config.centring) == (0.1, 4, 0.1)


@pytest.mark.parametrize("field, value, message", [
    ("loss", "wasserstein", "loss must be one of bce, hinge, relativistic, got 'wasserstein'"),
    ("r1_gamma", -1.0, "r1_gamma must be 0 or more, got -1.0"),
    ("r1_interval", 0, "r1_interval must be at least 1, got 0"),
    ("generator_average_rampup", 1.5, "generator_average_rampup must be in [0, 1], got 1.5"),
    ("twin_classifier", 1.5, "twin_classifier must be in [0, 1], got 1.5"),
    ("mode_seeking", -0.5, "mode_seeking must be 0 or more, got -0.5"),
    ("classifier_confidence", 1.0, "classifier_confidence must be in [0, 1), got 1.0"),
    ("generator_average_interval", 0, "generator_average_interval must be at least 1, got 0"),
    ("generator_top_k", 0.0, "generator_top_k must be in (0, 1], got 0.0"),
    ("generator_top_k", 1.5, "generator_top_k must be in (0, 1], got 1.5"),
    ("centring", -0.1, "centring must be 0 or more, got -0.1"),
    ("consistency", -1.0, "consistency must be 0 or more, got -1.0"),
    ("consistency_shift", 0, "consistency_shift must be from 1 to 8, got 0"),
    ("image_activation", "sigmoid", "image_activation must be one of tanh, hard_tanh, got 'sigmoid'"),
])
def test_bad_lever_values_are_refused_with_the_value(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("settings", [dict(classifier_weight=0.0), dict(conditional=False)])
def test_the_classifier_levers_need_the_auxiliary_classifier(settings):
    with pytest.raises(ValueError, match=re.escape("twin_classifier must be 0 when there is no auxiliary")):
        TrainConfig(twin_classifier=1.0, **settings)
    with pytest.raises(ValueError, match=re.escape("classifier_confidence must be 0 when there is no auxiliary")):
        TrainConfig(classifier_confidence=0.9, **settings)


def test_levers_are_settable_with_set():
    assert recipes.parse_settings(["loss=hinge", "spectral_norm=true", "r1_gamma=0.5", "r1_interval=8",
                                   "minibatch_std=yes", "generator_average_rampup=0.05",
                                   "twin_classifier=0.5", "image_activation=hard_tanh", "mode_seeking=2"]) == {
        "loss": "hinge", "spectral_norm": True, "r1_gamma": 0.5, "r1_interval": 8, "minibatch_std": True,
        "generator_average_rampup": 0.05, "twin_classifier": 0.5, "image_activation": "hard_tanh",
        "mode_seeking": 2.0}


def test_hinge_losses_follow_their_formulas_over_the_global_batch():
    real, fake = tf.constant([[2.0], [0.5], [-0.3], [1.0]]), tf.constant([[-2.0], [0.2], [-0.5], [1.5]])
    expected_d = np.mean(np.maximum(0, 1 - real.numpy()) + np.maximum(0, 1 + fake.numpy()))
    halves = [float(losses.hinge_discriminator_loss(real[i:i + 2], fake[i:i + 2], 4)) for i in (0, 2)]
    np.testing.assert_allclose(sum(halves), expected_d, rtol=1e-6)
    np.testing.assert_allclose(float(losses.hinge_generator_loss(fake, 4)), -np.mean(fake.numpy()), rtol=1e-6)
    with pytest.raises(ValueError, match="loss must be one of bce, hinge, relativistic, got 'l2'"):
        losses.adversarial_losses("l2")


def test_relativistic_losses_pair_each_real_image_with_a_fake():
    real, fake = tf.constant([[2.0], [0.5], [-0.3], [1.0]]), tf.constant([[-2.0], [0.2], [-0.5], [1.5]])
    generator_loss, discriminator_loss = losses.adversarial_losses("relativistic")
    softplus = lambda values: np.log1p(np.exp(values))  # noqa: E731
    difference = (real - fake).numpy()
    halves = [float(discriminator_loss(real[i:i + 2], fake[i:i + 2], 4)) for i in (0, 2)]
    np.testing.assert_allclose(sum(halves), np.mean(softplus(-difference)), rtol=1e-6)
    np.testing.assert_allclose(float(generator_loss(real, fake, 4)), np.mean(softplus(difference)), rtol=1e-6)


def test_r1_penalty_is_the_mean_squared_gradient_norm():
    gradients = tf.reshape(tf.range(2 * 28 * 28, dtype=tf.float32) / 1000.0, [2, 28, 28, 1])
    expected = np.mean(np.sum(gradients.numpy() ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(losses.r1_penalty(gradients, 2)), expected, rtol=1e-6)


def test_mode_seeking_loss_is_the_inverse_distance_ratio_of_each_pair_over_the_global_pairs():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    noise = rng.standard_normal((8, 5)).astype(np.float32)

    def inverse_ratio(first, second):
        ratio = np.abs(images[first] - images[second]).mean() / np.abs(noise[first] - noise[second]).mean()
        return 1 / (ratio + 1e-5)

    # 5 rows on one device: pairs (0, 3) and (1, 4); row 2 has no partner.
    np.testing.assert_allclose(float(losses.mode_seeking_loss(images[:5], noise[:5], 4)),
                               np.mean([inverse_ratio(0, 3), inverse_ratio(1, 4)]), rtol=1e-5)
    # Two replicas of 4 rows (global batch 8): each pairs its own rows, and the sum is the mean over all 4 pairs.
    replicas = [float(losses.mode_seeking_loss(images[rows], noise[rows], 8)) for rows in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(sum(replicas), np.mean([inverse_ratio(0, 2), inverse_ratio(1, 3),
                                                       inverse_ratio(4, 6), inverse_ratio(5, 7)]), rtol=1e-5)


def test_mode_seeking_lowers_as_the_pairs_draw_further_apart():
    noise = tf.constant([[0.0, 0.0], [1.0, 1.0]])
    near = tf.constant(np.stack([np.zeros((28, 28, 1)), np.full((28, 28, 1), 0.1)]), tf.float32)
    far = tf.constant(np.stack([np.zeros((28, 28, 1)), np.full((28, 28, 1), 0.9)]), tf.float32)
    assert float(losses.mode_seeking_loss(far, noise, 2)) < float(losses.mode_seeking_loss(near, noise, 2))


@pytest.mark.parametrize("batch", [4, 5])
def test_paired_fake_digits_repeat_the_first_half(batch):
    digits = step_lib.draw_fake_digits(tf.random.Generator.from_seed(0), batch, paired=True).numpy()
    assert digits.shape == (batch,) and digits.dtype == np.int32 and set(digits) <= set(range(10))
    first, second = losses.paired_halves(tf.constant(digits))
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    unpaired = step_lib.draw_fake_digits(tf.random.Generator.from_seed(0), 64).numpy()
    assert (unpaired[:32] != unpaired[32:]).any()


# G's weighted terms: each lever's field, and its term from the fakes and their noise (global batch 4).
G_TERMS = {"mode_seeking": lambda fakes, noise: losses.mode_seeking_loss(fakes, noise, 4),
           "centring": lambda fakes, noise: losses.centring_penalty(fakes, 4)}


@pytest.mark.parametrize("lever", G_TERMS)
def test_a_weighted_term_of_g_adds_weight_times_term_to_gs_loss_only(mnist_data_dir, lever):
    config = TrainConfig(batch_size=4, precision="float32")
    state, images, digits, noise, fake_digits = _state_and_batch(config, mnist_data_dir)
    kwargs = dict(training=False, classifier_weight=config.classifier_weight)
    plain = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, **kwargs)
    weighted = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, **{lever: 2.0}, **kwargs)
    term = float(G_TERMS[lever](state.generator([noise, fake_digits], training=False), noise))
    assert term > 0
    np.testing.assert_allclose(float(weighted[0]), float(plain[0]) + 2.0 * term, rtol=1e-5)
    np.testing.assert_allclose(float(weighted[1]), float(plain[1]), rtol=1e-6)


def test_top_k_share_falls_linearly_from_all_fakes_to_the_final_share_and_holds():
    shares = [float(losses.top_k_share(step, 100, 0.5)) for step in (0, 50, 100, 400)]
    np.testing.assert_allclose(shares, [1.0, 0.75, 0.5, 0.5])


def test_strongest_fakes_keep_the_rows_d_rates_most_real_with_their_paired_real_rows():
    real = tf.constant([[10.0], [11.0], [12.0], [13.0], [14.0]])
    fake = tf.constant([[0.5], [-2.0], [3.0], [1.0], [-1.0]])
    kept_real, kept_fake, global_count = losses.strongest_fakes(real, fake, tf.constant(0.5), global_batch_size=10)
    np.testing.assert_array_equal(kept_fake.numpy().ravel(), [3.0, 1.0, 0.5])  # ceil(0.5 x 5) = 3 rows
    np.testing.assert_array_equal(kept_real.numpy().ravel(), [12.0, 13.0, 10.0])
    assert int(global_count) == 6  # 3 rows on each of the 2 replicas a global batch of 10 implies
    assert int(losses.strongest_fakes(real, fake, tf.constant(0.01), 5)[2]) == 1  # never no row at all


def test_top_k_counts_only_the_strongest_fakes_in_gs_adversarial_loss(mnist_data_dir):
    config = TrainConfig(batch_size=4, precision="float32")
    state, images, digits, noise, fake_digits = _state_and_batch(config, mnist_data_dir)
    state.step.assign(100)  # past the end of a 100-step run: the final share, a half
    kwargs = dict(training=False, classifier_weight=config.classifier_weight)
    plain = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, **kwargs)
    top = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, generator_top_k=0.5,
                                  total_steps=100, **kwargs)
    fakes = state.generator([noise, fake_digits], training=False)
    fake_logit, fake_classes = state.discriminator([fakes, fake_digits], training=False)
    strongest = np.sort(fake_logit.numpy().ravel())[-2:]
    expected = (float(losses.generator_loss(tf.constant(strongest[:, None]), 2))
                + config.classifier_weight * float(losses.classifier_loss(fake_classes, fake_digits, 4)))
    np.testing.assert_allclose(float(top[0]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(top[1]), float(plain[1]), rtol=1e-6)  # D's loss is untouched
    state.step.assign(0)  # the first step keeps every fake
    start = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, generator_top_k=0.5,
                                    total_steps=100, **kwargs)
    np.testing.assert_allclose(float(start[0]), float(plain[0]), rtol=1e-6)


def test_translate_moves_each_image_by_whole_pixels_onto_background():
    images = np.full((2, 28, 28, 1), -1.0, np.float32)
    images[0, 10, 12], images[1, 0, 0], images[1, 5, 5] = 1.0, 0.5, 0.25
    moved = losses.translate(tf.constant(images), tf.constant([[2, -1], [-1, 0]])).numpy()[..., 0]
    assert [tuple(index) for index in np.argwhere(moved[0] > -1)] == [(9, 14)]  # 2 right, 1 up
    assert moved[1, 5, 4] == 0.25 and moved[1, 0, 0] == -1.0  # 1 left: the corner pixel left the image
    compiled = tf.function(losses.translate, jit_compile=True)  # `xla=true` runs it inside XLA
    np.testing.assert_array_equal(compiled(tf.constant(images), tf.constant([[2, -1], [-1, 0]])).numpy()[..., 0], moved)


def test_consistency_penalty_is_the_mean_squared_change_of_the_logit_over_the_global_batch():
    penalty = losses.consistency_penalty(tf.constant([[1.0], [2.0]]), tf.constant([[0.0], [4.0]]), 4)
    assert float(penalty) == (1.0 + 4.0) / 4


def test_consistency_adds_bcr_to_ds_loss_only(mnist_data_dir):
    config = TrainConfig(batch_size=4, precision="float32")
    state, images, digits, noise, fake_digits = _state_and_batch(config, mnist_data_dir)
    kwargs = dict(training=False, classifier_weight=config.classifier_weight)
    plain = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, **kwargs)
    shifts = tf.constant([[[1, 0], [0, 2], [-2, -1], [0, 0]], [[0, 1], [2, 2], [0, 0], [-1, 0]]])
    regularised = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, consistency=3.0,
                                          shifts=shifts, **kwargs)
    fakes = state.generator([noise, fake_digits], training=False)
    expected = 0.0
    for batch, batch_digits, batch_shifts in ((images, digits, shifts[0]), (fakes, fake_digits, shifts[1])):
        logits = state.discriminator([batch, batch_digits], training=False)[0]
        moved = state.discriminator([losses.translate(batch, batch_shifts), batch_digits], training=False)[0]
        expected += float(tf.reduce_sum(tf.square(logits - moved))) / 4
    assert expected > 0
    np.testing.assert_allclose(float(regularised[1]), float(plain[1]) + 3.0 * expected, rtol=1e-5)
    np.testing.assert_allclose(float(regularised[0]), float(plain[0]), rtol=1e-6)  # G's loss is untouched


def test_centring_penalty_is_the_squared_distance_of_each_centre_of_mass_from_mnists():
    images = np.full((3, 28, 28, 1), -1.0, np.float32)
    images[0, 14, 14] = 1.0  # on the centre
    images[1, 10, 17] = 1.0  # 4 rows up, 3 columns right: 25 px²
    images[2, 14, 12:17:4] = 1.0  # two dots either side of the centre: their mean is on it
    penalty = float(losses.centring_penalty(tf.constant(images), 4))
    np.testing.assert_allclose(penalty, 25.0 / 4, rtol=1e-3)  # the blank background weighs nothing


def test_real_mnist_digits_sit_on_the_centre_the_penalty_pulls_towards(mnist_data_dir):
    from mnist_data import acquire

    real = acquire.load_mnist(mnist_data_dir).test_images[:500].astype(np.float32) / 127.5 - 1.0
    mean_squared_distance = float(losses.centring_penalty(tf.constant(real), 500))
    assert mean_squared_distance < 0.25  # whole-pixel placement leaves under half a pixel either way


def test_classifier_confidence_counts_each_fake_only_below_that_probability():
    # Three fakes whose asked-for digit D reads with probability 0.95, 0.5 and 0.1.
    probabilities = np.full((3, 10), 0.0, np.float32)
    for row, chance in enumerate([0.95, 0.5, 0.1]):
        probabilities[row] = (1 - chance) / 9
        probabilities[row, row] = chance
    logits, digits = tf.constant(np.log(probabilities)), tf.constant([0, 1, 2])
    cross_entropy = -np.log([0.95, 0.5, 0.1])
    np.testing.assert_allclose(float(losses.classifier_loss(logits, digits, 4)), cross_entropy.sum() / 4, rtol=1e-5)
    expected = np.maximum(cross_entropy + np.log(0.9), 0).sum() / 4  # the first fake no longer counts
    np.testing.assert_allclose(float(losses.classifier_loss(logits, digits, 4, confidence=0.9)), expected, rtol=1e-5)
    assert float(losses.classifier_loss(logits[:1], digits[:1], 4, confidence=0.9)) == 0.0


def test_classifier_confidence_changes_gs_loss_only(mnist_data_dir):
    config = TrainConfig(batch_size=4, precision="float32")
    state, images, digits, noise, fake_digits = _state_and_batch(config, mnist_data_dir)
    kwargs = dict(training=False, classifier_weight=2.0)
    plain = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True, **kwargs)
    confident = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True,
                                        classifier_confidence=0.5, **kwargs)
    fakes = state.generator([noise, fake_digits], training=False)
    fake_logit, fake_classes = state.discriminator([fakes, fake_digits], training=False)
    expected = losses.generator_loss(fake_logit, 4) + 2.0 * losses.classifier_loss(fake_classes, fake_digits, 4, 0.5)
    np.testing.assert_allclose(float(confident[0]), float(expected), rtol=1e-5)
    assert float(confident[0]) < float(plain[0])  # an untrained D reads no fake at 0.5: each counts log 2 less
    np.testing.assert_allclose(float(confident[1]), float(plain[1]), rtol=1e-6)


@pytest.mark.slow
def test_the_train_function_caps_gs_digit_loss_only(mnist_data_dir, monkeypatch):
    from mnist_data import acquire

    received = []
    original = losses.classifier_loss

    def recording(*args, confidence=0.0, **kwargs):
        received.append(confidence)
        return original(*args, confidence=confidence, **kwargs)

    monkeypatch.setattr(losses, "classifier_loss", recording)  # before the step is traced
    strategy = tf.distribute.get_strategy()
    config = TrainConfig(batch_size=4, precision="float32", classifier_confidence=0.9)
    state = step_lib.set_globals_and_build_state(config, strategy)
    mnist = acquire.load_mnist(mnist_data_dir)
    dataset_fn = data.epoch_dataset_fn(mnist.train_images[:8], mnist.train_labels[:8], 4, seed=0, epoch=0)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    step_lib.make_train_function(strategy, state, config, 4)(iterator, tf.constant(1))
    assert sorted(received) == [0.0, 0.9]  # D's digit loss on the real images, then G's on the fakes, capped


def test_minibatch_std_appends_the_std_over_groups_of_four():
    features = np.random.default_rng(0).standard_normal((8, 3, 3, 2)).astype(np.float32)
    out = models.MinibatchStd()(tf.constant(features)).numpy()
    assert out.shape == (8, 3, 3, 3)
    np.testing.assert_array_equal(out[..., :2], features)
    grouped = features.reshape(4, 2, 3, 3, 2)  # image i = g * 2 + m
    per_member = np.sqrt(grouped.var(axis=0) + 1e-8).mean(axis=(1, 2, 3))
    for image in range(8):
        np.testing.assert_allclose(out[image, ..., 2], per_member[image % 2], rtol=1e-5)
    odd = models.MinibatchStd()(tf.constant(features[:6])).numpy()  # 6 does not divide by 4: one group
    np.testing.assert_allclose(odd[0, 0, 0, 2], np.sqrt(features[:6].var(axis=0) + 1e-8).mean(), rtol=1e-5)


def test_spectral_conv_divides_its_kernel_by_the_largest_singular_value():
    # A fixed kernel: how fast the iterations converge depends on its two largest singular values.
    layer = models.SpectralConv2D(8, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(seed=0))
    layer.build((None, 7, 7, 4))
    for _ in range(300):  # power iterations converge on the top singular vector
        normalized = models._spectrally_normalized(layer, layer.kernel, training=True)
    matrix = normalized.numpy().reshape(-1, 8)
    np.testing.assert_allclose(np.linalg.svd(matrix, compute_uv=False)[0], 1.0, rtol=1e-3)
    before = layer.spectral_u.numpy().copy()
    layer(tf.ones([1, 7, 7, 4]), training=False)
    np.testing.assert_array_equal(layer.spectral_u.numpy(), before)  # inference leaves u alone


def test_discriminator_builds_with_every_lever():
    plain = models.build_discriminator(architecture="tutorial_cbn_3x3", classifier_head=True, dropout=0.0)
    both = models.build_discriminator(architecture="tutorial_cbn_3x3", classifier_head=True, dropout=0.0,
                                      spectral_norm=True, minibatch_std=True)
    assert [weight.path for weight in both.non_trainable_weights] == [
        "down1/spectral_u", "down2/spectral_u", "logit/linear/spectral_u", "class_logits/spectral_u"]
    assert both.get_layer("features").output.shape[-1] == plain.get_layer("features").output.shape[-1] + 7 * 7
    logit, classes = both([tf.zeros([4, 28, 28, 1]), tf.constant([0, 1, 2, 3])])
    assert logit.shape == (4, 1) and classes.shape == (4, 10)


def test_twin_classifier_moves_its_cross_entropy_on_the_fakes_from_g_to_d(mnist_data_dir):
    """TAC-GAN: D's loss adds weight x CE(twin(fake), asked digit); G's loss subtracts its share of it."""
    config = TrainConfig(batch_size=4, precision="float32", classifier_weight=2.0, twin_classifier=0.5)
    state, images, digits, noise, fake_digits = _state_and_batch(config, mnist_data_dir)
    generator_loss, discriminator_loss = step_lib.compute_losses(state, images, digits, noise, fake_digits, 4, True,
                                                                 training=False, classifier_weight=2.0,
                                                                 twin_classifier=0.5)
    fakes = state.generator([noise, fake_digits], training=False)
    real_logit, real_classes, _ = state.discriminator([images, digits], training=False)
    fake_logit, fake_classes, fake_twin = state.discriminator([fakes, fake_digits], training=False)
    twin = losses.classifier_loss(fake_twin, fake_digits, 4)
    assert float(twin) > 0
    expected_generator = (losses.generator_loss(fake_logit, 4)
                          + 2.0 * (losses.classifier_loss(fake_classes, fake_digits, 4) - 0.5 * twin))
    expected_discriminator = (losses.discriminator_loss(real_logit, fake_logit, 4)
                              + 2.0 * (losses.classifier_loss(real_classes, digits, 4) + twin))
    np.testing.assert_allclose([float(generator_loss), float(discriminator_loss)],
                               [float(expected_generator), float(expected_discriminator)], rtol=1e-5)


def test_twin_classifier_head_needs_the_classifier_head():
    with pytest.raises(ValueError, match="twin_classifier_head needs the classifier head"):
        models.build_discriminator(architecture="tutorial_cbn_3x3", twin_classifier_head=True)


def test_average_rampup_sets_a_half_life_of_a_share_of_the_steps():
    config = TrainConfig(batch_size=GLOBAL_BATCH, generator_average_decay=0.999, generator_average_rampup=0.1)
    state = step_lib.set_globals_and_build_state(config, tf.distribute.get_strategy())
    weights = state.generator.trainable_weights[0]
    start = weights.numpy().copy()
    weights.assign(start + 1.0)
    state.step.assign(200)  # a half-life of 20 steps
    step_lib.update_generator_average(state, 0.999, rampup=0.1)
    decay = 0.5 ** (1 / 20)
    average = state.generator_average.trainable_weights[0].numpy()
    np.testing.assert_allclose(average, decay * start + (1 - decay) * (start + 1.0), rtol=1e-5, atol=1e-6)


def test_an_average_updated_every_k_steps_decays_by_the_kth_power():
    config = TrainConfig(batch_size=GLOBAL_BATCH, generator_average_decay=0.99)
    state = step_lib.set_globals_and_build_state(config, tf.distribute.get_strategy())
    weights = state.generator.trainable_weights[0]
    start = weights.numpy().copy()
    weights.assign(start + 1.0)
    state.step.assign(10_000)  # past the warm-up
    step_lib.update_generator_average(state, 0.99, interval=4)
    average = state.generator_average.trainable_weights[0].numpy()
    np.testing.assert_allclose(average, 0.99 ** 4 * start + (1 - 0.99 ** 4) * (start + 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interval, updated", [(1, True), (3, True), (4, False)])
def test_the_average_is_updated_only_on_steps_that_are_multiples_of_the_interval(mnist_data_dir, interval, updated):
    from mnist_data import acquire

    config = TrainConfig(batch_size=GLOBAL_BATCH, generator_average_interval=interval)
    strategy = tf.distribute.get_strategy()
    state = step_lib.set_globals_and_build_state(config, strategy)
    mnist = acquire.load_mnist(mnist_data_dir)
    dataset_fn = data.epoch_dataset_fn(mnist.train_images[:64], mnist.train_labels[:64], GLOBAL_BATCH, seed=0, epoch=0)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    before = [weight.numpy().copy() for weight in state.generator_average.trainable_weights]
    step_lib.make_train_function(strategy, state, config, GLOBAL_BATCH)(iterator, tf.constant(3))  # steps 1-3
    after = state.generator_average.trainable_weights
    assert any(not np.array_equal(old, new.numpy()) for old, new in zip(before, after)) == updated


@pytest.mark.slow
@pytest.mark.parametrize("loss", config_lib.LOSSES)
def test_every_lever_trains_on_two_replicas_under_each_loss_and_keeps_them_identical(mnist_data_dir, loss):
    """Every lever in one step graph per loss (each lever's arithmetic is checked alone above):
    their variables and updates stay in sync across the replicas."""
    strategy = strategy_lib.create_strategy(gpus=0, cpu_replicas=2)
    config = TrainConfig(batch_size=GLOBAL_BATCH, cpu_replicas=2, **{**ALL_LEVERS, "loss": loss})
    state = step_lib.set_globals_and_build_state(config, strategy)
    from mnist_data import acquire

    mnist = acquire.load_mnist(mnist_data_dir)
    dataset_fn = data.epoch_dataset_fn(mnist.train_images[:64], mnist.train_labels[:64], GLOBAL_BATCH, seed=0, epoch=0)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    before = [variable.numpy().copy() for variable in state.discriminator.trainable_variables]
    train = step_lib.make_train_function(strategy, state, config, GLOBAL_BATCH)
    generator_loss, discriminator_loss = (float(value) for value in train(iterator, tf.constant(3)))
    assert np.isfinite(generator_loss) and np.isfinite(discriminator_loss)
    after = [variable.numpy() for variable in state.discriminator.trainable_variables]
    assert any(not np.allclose(old, new) for old, new in zip(before, after)), "D did not change"
    for variable in state.generator.variables + state.discriminator.variables:
        copies = [value.numpy() for value in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)


def test_r1_adds_its_penalty_to_ds_gradients_only_on_regularizing_steps(mnist_data_dir):
    config = TrainConfig(batch_size=4, precision="float32", r1_gamma=10.0, r1_interval=4)
    state, images, digits, noise, fake_digits = _state_and_batch(config, mnist_data_dir)
    kwargs = dict(global_batch_size=4, conditional=True, classifier_weight=config.classifier_weight)
    plain = step_lib.losses_and_gradients(state, images, digits, noise, fake_digits, tf.constant(True), **kwargs)
    off = step_lib.losses_and_gradients(state, images, digits, noise, fake_digits, tf.constant(False),
                                        r1_weight=20.0, **kwargs)
    on = step_lib.losses_and_gradients(state, images, digits, noise, fake_digits, tf.constant(True),
                                       r1_weight=20.0, **kwargs)
    dense = lambda gradients: [tf.convert_to_tensor(gradient).numpy() for gradient in gradients]  # noqa: E731
    np.testing.assert_allclose(float(on[1]), float(plain[1]), rtol=1e-6)  # the reported loss has no penalty
    for plain_gradient, off_gradient in zip(dense(plain[3]), dense(off[3])):
        np.testing.assert_allclose(off_gradient, plain_gradient, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(dense(on[3]), dense(plain[3])))
    for plain_gradient, on_gradient in zip(dense(plain[2]), dense(on[2])):  # G's gradients do not see the penalty
        np.testing.assert_allclose(on_gradient, plain_gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_every_lever_together_resumes_exactly(tmp_path, mnist_data_dir):
    """4 steps straight, and 2 + resume + 2: the same checkpoint, spectral-norm vectors and all."""
    def run(run_dir, max_steps):
        config = TrainConfig(run_dir=str(run_dir), data_dir=mnist_data_dir, batch_size=GLOBAL_BATCH, cpu_replicas=2,
                             steps_per_call=1, checkpoint_every_steps=1, max_steps=max_steps,
                             evaluate_every_epoch=False, **ALL_LEVERS)
        return loop.train(config, report=lambda line: None, progress=False)

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert straight.step == resumed.step == 4
    saved = {name for name, _ in tf.train.list_variables(straight.checkpoint)}
    assert sum("spectral_u" in name for name in saved) == 5  # 2 convolutions, the logit, both digit heads
    assert_same_training(resumed.checkpoint, straight.checkpoint)


def _state_and_batch(config: TrainConfig, mnist_data_dir: str):
    """(state on one device, 4 real images in [-1, 1], their digits, noise, the fakes' digits)."""
    from mnist_data import acquire

    state = step_lib.set_globals_and_build_state(config, tf.distribute.get_strategy())
    mnist = acquire.load_mnist(mnist_data_dir)
    images = tf.constant(mnist.train_images[:4].astype(np.float32) / 127.5 - 1.0)
    digits = tf.constant(mnist.train_labels[:4].astype(np.int32))
    noise, fake_digits = tf.random.normal([4, config.latent_dim], seed=1), tf.constant([3, 1, 4, 1])
    return state, images, digits, noise, fake_digits


@pytest.mark.parametrize("activation", config_lib.IMAGE_ACTIVATIONS)
def test_the_image_activation_reaches_g_and_its_moving_average(activation):
    config = TrainConfig(batch_size=4, image_activation=activation)
    state = step_lib.set_globals_and_build_state(config, tf.distribute.get_strategy())
    for generator in (state.generator, state.generator_average):
        assert generator.get_layer("images").activation.__name__ == activation


@pytest.mark.slow
def test_a_run_resumes_and_exports_only_under_the_image_activation_it_trained_with(tmp_path, mnist_data_dir):
    from export import bundle

    run = dict(run_dir=str(tmp_path), data_dir=mnist_data_dir, batch_size=GLOBAL_BATCH, steps_per_call=1,
               evaluate_every_epoch=False)
    loop.train(TrainConfig(max_steps=2, image_activation="tanh", **run), report=lambda line: None, progress=False)
    config_file = tmp_path / config_lib.CONFIG_FILE
    recorded = json.loads(config_file.read_text())
    del recorded["image_activation"]  # as config.json was written before the field existed: tanh
    config_file.write_text(json.dumps(recorded))

    with pytest.raises(ValueError, match=re.escape("was trained with image_activation=tanh (its config.json), not "
                                                   "hard_tanh; --set image_activation=tanh to resume it")):
        loop.train(TrainConfig(max_steps=4, **run), report=lambda line: None, progress=False)
    assert json.loads(config_file.read_text()) == recorded  # the refused resume rewrote nothing

    resumed = loop.train(TrainConfig(max_steps=4, image_activation="tanh", **run), report=lambda line: None,
                         progress=False)
    assert resumed.step == 4
    generator, _ = bundle.restore_generator(resumed.checkpoint, bundle.train_config_for(resumed.checkpoint, str(tmp_path)))
    assert generator.get_layer("images").activation.__name__ == "tanh"
