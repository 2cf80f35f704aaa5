"""Model builders: shapes, dtypes, and that the digit reaches G's BatchNorm in `tutorial_cbn`."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import precision
from trainer import config as config_lib, models


def test_config_lists_every_architecture_and_image_activation():
    assert set(config_lib.ARCHITECTURES) == set(models.ARCHITECTURES)
    assert config_lib.IMAGE_ACTIVATIONS == models.IMAGE_ACTIVATIONS


@pytest.mark.parametrize("architecture", sorted(models.ARCHITECTURES))
def test_generator_maps_noise_and_digit_to_images_in_range(architecture):
    generator = models.build_generator(16, conditional=True, architecture=architecture)
    images = generator([tf.random.normal([3, 16], seed=1), tf.constant([0, 4, 9])], training=False)
    assert images.shape == (3, 28, 28, 1) and images.dtype == tf.float32
    assert float(tf.reduce_max(tf.abs(images))) <= 1.0


def test_digit_batch_norm_scales_and_shifts_only_the_digits_it_belongs_to():
    generator = models.build_generator(16, conditional=True, architecture="tutorial_cbn")
    scale_shift = generator.get_layer("up2_digit_scale_shift")
    noise = tf.random.normal([2, 16], seed=2)
    digits = tf.constant([3, 5])
    before = generator([noise, digits], training=False).numpy()
    # Starts as plain BatchNorm (gamma = beta = 0); now give digit 3 its own scale and shift.
    gamma = np.zeros((models.NUM_CLASSES, 64), np.float32)
    gamma[3] = 0.5
    scale_shift.gamma.embeddings.assign(gamma)
    scale_shift.beta.embeddings.assign(gamma)
    after = generator([noise, digits], training=False).numpy()
    assert not np.allclose(before[0], after[0]), "digit 3's images should change"
    np.testing.assert_allclose(before[1], after[1], rtol=1e-6, atol=1e-6)  # digit 5's should not


def test_digit_scale_shift_keeps_a_mixed_precision_compute_dtype():
    with precision.keras_policy("mixed_bfloat16"):
        generator = models.build_generator(16, conditional=True, architecture="tutorial_cbn")
        layer = generator.get_layer("up1_digit_scale_shift")
        assert layer.gamma.embeddings.dtype == "float32"  # variables stay float32
        images = generator([tf.random.normal([2, 16]), tf.constant([1, 2])], training=True)
        assert images.dtype == tf.float32


def test_unconditional_generator_ignores_digit_batch_norm():
    conditional = models.build_generator(16, conditional=False, architecture="tutorial_cbn")
    plain = models.build_generator(16, conditional=False, architecture="tutorial")
    assert conditional.count_params() == plain.count_params()


def test_discriminator_without_dropout_has_no_dropout_layers_and_trains_deterministically():
    images, digits = tf.random.uniform([4, 28, 28, 1], -1, 1, seed=3), tf.constant([0, 1, 2, 3])
    with_dropout = models.build_discriminator(architecture="tutorial_cbn_3x3")
    without = models.build_discriminator(architecture="tutorial_cbn_3x3", dropout=0.0)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in with_dropout.layers)
    assert not any("dropout" in layer.name for layer in without.layers)
    assert without.count_params() == with_dropout.count_params()  # dropout has no weights: checkpoints still match
    np.testing.assert_array_equal(without([images, digits], training=True).numpy(),
                                  without([images, digits], training=False).numpy())


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_config_refuses_a_dropout_rate_outside_0_to_1(rate):
    with pytest.raises(ValueError, match=f"discriminator_dropout must be in \\[0, 1\\), got {rate}"):
        config_lib.TrainConfig(discriminator_dropout=rate)


def test_a_config_json_from_before_the_dropout_field_reads_as_the_tutorials_dropout(tmp_path):
    path = config_lib.TrainConfig(run_dir=str(tmp_path)).save()
    assert config_lib.TrainConfig.load(str(tmp_path)).discriminator_dropout == 0.0  # recorded: kept
    values = json.loads(path.read_text())
    del values["discriminator_dropout"]  # as config.json was written before the field existed
    path.write_text(json.dumps(values))
    assert config_lib.TrainConfig.load(str(tmp_path)).discriminator_dropout == 0.3


def test_a_config_json_from_before_the_image_activation_field_reads_as_tanh(tmp_path):
    path = config_lib.TrainConfig(run_dir=str(tmp_path)).save()
    assert config_lib.TrainConfig.load(str(tmp_path)).image_activation == "hard_tanh"  # recorded: kept
    values = json.loads(path.read_text())
    del values["image_activation"]  # as config.json was written before the field existed
    path.write_text(json.dumps(values))
    assert config_lib.TrainConfig.load(str(tmp_path)).image_activation == "tanh"


def test_a_config_json_from_before_mode_seeking_reads_as_none_and_an_average_on_every_step(tmp_path):
    path = config_lib.TrainConfig(run_dir=str(tmp_path)).save()
    recorded = config_lib.TrainConfig.load(str(tmp_path))
    assert (recorded.mode_seeking, recorded.generator_average_interval) == (0.1, 4)  # recorded: kept
    values = json.loads(path.read_text())
    del values["mode_seeking"], values["generator_average_interval"]  # as written before the fields existed
    path.write_text(json.dumps(values))
    old = config_lib.TrainConfig.load(str(tmp_path))
    assert (old.mode_seeking, old.generator_average_interval) == (0.0, 1)


def test_a_config_json_from_before_top_k_consistency_and_centring_reads_them_as_off(tmp_path):
    path = config_lib.TrainConfig(run_dir=str(tmp_path), generator_top_k=0.5, consistency=2.0, centring=0.3).save()
    values = json.loads(path.read_text())
    assert (values["generator_top_k"], values["consistency"], values["centring"]) == (0.5, 2.0, 0.3)
    del values["generator_top_k"], values["consistency"], values["centring"]  # as written before they existed
    path.write_text(json.dumps(values))
    old = config_lib.TrainConfig.load(str(tmp_path))
    assert (old.generator_top_k, old.consistency, old.centring) == (1.0, 0.0, 0.0)


def test_the_pixel_layers_take_their_own_kernel_size():
    generator = models.build_generator(16, conditional=True, architecture="tutorial_cbn_3x3_5x5_pixels")
    discriminator = models.build_discriminator(architecture="tutorial_cbn_3x3_5x5_pixels", classifier_head=True)
    assert generator.get_layer("to_image").kernel.shape == (5, 5, 1, 64)  # Conv2DTranspose: [h, w, out, in]
    assert generator.get_layer("up2").kernel.shape[:2] == (3, 3)
    assert discriminator.get_layer("down1").kernel.shape == (5, 5, 1, 64)
    assert discriminator.get_layer("down2").kernel.shape[:2] == (3, 3)
    plain = models.build_generator(16, conditional=True, architecture="tutorial_cbn_3x3")
    assert plain.get_layer("to_image").kernel.shape[:2] == (3, 3)


def test_the_4x4_architecture_puts_4x4_kernels_where_the_stride_is_2():
    generator = models.build_generator(16, conditional=True, architecture="tutorial_cbn_3x3_4x4_up")
    discriminator = models.build_discriminator(architecture="tutorial_cbn_3x3_4x4_up", classifier_head=True)
    kernels = {name: generator.get_layer(name).kernel.shape[:2] for name in ("up1", "up2", "to_image")}
    assert kernels == {"up1": (3, 3), "up2": (4, 4), "to_image": (4, 4)}  # up1 keeps 7x7 (stride 1)
    assert discriminator.get_layer("down1").kernel.shape[:2] == (4, 4)
    assert discriminator.get_layer("down2").kernel.shape[:2] == (3, 3)
    images = generator([tf.random.normal([2, 16], seed=1), tf.constant([3, 7])], training=False)
    assert images.shape == (2, 28, 28, 1)


def test_hard_tanh_passes_logits_inside_minus_one_to_one_and_clips_the_rest_to_exactly_one():
    generator = models.build_generator(16, conditional=True, architecture="tutorial_cbn_3x3", image_activation="hard_tanh")
    layer = generator.get_layer("to_image")
    layer.kernel.assign(layer.kernel * 500.0)  # logits large enough that many pass ±1
    inputs = [tf.random.normal([3, 16], seed=3), tf.constant([0, 4, 9])]
    logits = keras.Model(generator.inputs, layer.output)(inputs, training=False).numpy()
    images = generator(inputs, training=False).numpy()
    inside = np.abs(logits) < 1
    assert inside.any() and (logits > 1).any() and (logits < -1).any()
    np.testing.assert_allclose(images[inside], logits[inside], rtol=1e-6)
    assert (images[logits >= 1] == 1.0).all() and (images[logits <= -1] == -1.0).all()


def test_an_unknown_image_activation_is_a_value_error():
    with pytest.raises(ValueError, match="image_activation must be one of tanh, hard_tanh, got 'relu'"):
        models.build_generator(16, image_activation="relu")
