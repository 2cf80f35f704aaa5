"""GAN losses (binary cross-entropy on logits, the hinge loss, or the relativistic pairing loss), averaged over
the GLOBAL batch.

Each replica divides its sum of per-example losses by the global batch size
(`tf.nn.compute_average_loss`), so summing the replicas' losses (and gradients) gives the
single-device mean. We use `tf.nn` rather than Keras loss objects on purpose: Keras 3 losses with
the default reduction already divide by the replica count under a strategy, and doing both would
scale the gradients by 1/N twice.
"""
from __future__ import annotations

import math

import tensorflow as tf


def discriminator_loss(real_logits, fake_logits, global_batch_size: int, real_label: float = 1.0):
    """D's loss: real → `real_label` (1, or e.g. 0.9 for one-sided smoothing), fake → 0. Logits [B, 1] float32."""
    real = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.fill(tf.shape(real_logits), real_label), logits=real_logits)
    fake = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.zeros_like(fake_logits), logits=fake_logits)
    return tf.nn.compute_average_loss(tf.squeeze(real + fake, -1), global_batch_size=global_batch_size)


def generator_loss(fake_logits, global_batch_size: int):
    """G's non-saturating loss: the discriminator should call the fakes real (label 1)."""
    fake = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.ones_like(fake_logits), logits=fake_logits)
    return tf.nn.compute_average_loss(tf.squeeze(fake, -1), global_batch_size=global_batch_size)


def classifier_loss(class_logits, digits, global_batch_size: int, confidence: float = 0.0):
    """AC-GAN's auxiliary loss: cross-entropy of D's digit logits [B, 10] float32 against digits int32 [B].

    With `confidence` in (0, 1) each example counts only by how far its cross-entropy exceeds
    -log(confidence): max(0, CE + log(confidence)), zero once the digit's probability reaches it.
    """
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=digits, logits=class_logits)
    if confidence:
        per_example = tf.nn.relu(per_example + math.log(confidence))
    return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)


def hinge_discriminator_loss(real_logits, fake_logits, global_batch_size: int):
    """D's hinge loss: relu(1 - D(real)) + relu(1 + D(fake)). Logits [B, 1] float32."""
    per_example = tf.nn.relu(1.0 - real_logits) + tf.nn.relu(1.0 + fake_logits)
    return tf.nn.compute_average_loss(tf.squeeze(per_example, -1), global_batch_size=global_batch_size)


def hinge_generator_loss(fake_logits, global_batch_size: int):
    """G's loss under the hinge loss: -D(fake), the discriminator's logit on the fakes pushed up."""
    return tf.nn.compute_average_loss(tf.squeeze(-fake_logits, -1), global_batch_size=global_batch_size)


def relativistic_discriminator_loss(real_logits, fake_logits, global_batch_size: int):
    """RpGAN's D loss (Jolicoeur-Martineau 2019; R3GAN, Huang et al. 2024): softplus(D(fake) - D(real)), each
    real image paired with the fake in its row. Logits [b, 1] float32."""
    return generator_loss(real_logits - fake_logits, global_batch_size)  # the same softplus, mirrored


def relativistic_generator_loss(real_logits, fake_logits, global_batch_size: int):
    """RpGAN's G loss: softplus(D(real) - D(fake)), the fake pushed above the real image it is paired with."""
    return generator_loss(fake_logits - real_logits, global_batch_size)


def _fakes_only(loss_function):
    return lambda real_logits, fake_logits, global_batch_size: loss_function(fake_logits, global_batch_size)


# TrainConfig.loss's values → (G's loss, D's loss), both taking (real_logits, fake_logits, global_batch_size).
ADVERSARIAL_LOSSES = {
    "bce": (_fakes_only(generator_loss), discriminator_loss),
    "hinge": (_fakes_only(hinge_generator_loss), hinge_discriminator_loss),
    "relativistic": (relativistic_generator_loss, relativistic_discriminator_loss),
}


def adversarial_losses(loss: str):
    """(generator_loss, discriminator_loss) of `loss`, a key of ADVERSARIAL_LOSSES.

    Both take (real_logits, fake_logits, global_batch_size); only the relativistic G loss reads the
    real logits (its gradient still flows only through the fakes, as G makes only those).
    """
    if loss not in ADVERSARIAL_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(ADVERSARIAL_LOSSES)}, got {loss!r}")
    return ADVERSARIAL_LOSSES[loss]


def paired_halves(batch):
    """(first, second) rows of a batch of b paired as MSGAN pairs them: row i with row ceil(b/2) + i, i < b // 2."""
    pairs = tf.shape(batch)[0] // 2
    offset = tf.shape(batch)[0] - pairs
    return batch[:pairs], batch[offset:offset + pairs]


def mode_seeking_loss(images, noise, global_batch_size: int):
    """MSGAN's mode-seeking term (Mao et al. 2019) for G: 1 / (ratio + 1e-5) per pair, averaged over the global pairs.

    images float [b, 28, 28, 1] (G's fakes) and noise float32 [b, latent]; each pair (`paired_halves`) was
    drawn for the same digit from two noise vectors, and ratio = mean |image difference| / mean |noise
    difference|. G lowers the term by drawing distinct images from distinct noise, which works
    against collapsing many noise vectors onto one style.
    """
    first_images, second_images = paired_halves(tf.cast(images, tf.float32))
    first_noise, second_noise = paired_halves(tf.cast(noise, tf.float32))
    image_distance = tf.reduce_mean(tf.abs(first_images - second_images), axis=[1, 2, 3])
    noise_distance = tf.reduce_mean(tf.abs(first_noise - second_noise), axis=1)
    per_pair = 1.0 / (image_distance / noise_distance + 1e-5)
    return tf.nn.compute_average_loss(per_pair, global_batch_size=max(global_batch_size // 2, 1))


def top_k_share(step, total_steps: int, final_share: float):
    """The share of fakes top-k training keeps at `step`: 1 at step 0, falling linearly to `final_share` at
    `total_steps` and held there. A float32 scalar tensor."""
    progress = tf.minimum(tf.cast(step, tf.float32) / float(max(total_steps, 1)), 1.0)
    return 1.0 - (1.0 - final_share) * progress


def strongest_fakes(real_logits, fake_logits, share, global_batch_size: int):
    """Top-k training (Sinha et al. 2020): the rows of this replica's fakes that D rates most real.

    Logits float32 [b, 1]; `share` a float32 scalar in (0, 1]. Keeps k = ceil(share x b) rows (at least
    one) of the fakes' logits and of the real logits paired with them (the relativistic loss pairs
    rows), and returns (real_logits [k, 1], fake_logits [k, 1], the global count of kept rows), so a
    loss averaged over that count weights every kept fake as the whole batch's mean would.
    """
    batch = tf.shape(fake_logits)[0]
    kept = tf.maximum(tf.cast(tf.math.ceil(share * tf.cast(batch, tf.float32)), tf.int32), 1)
    strongest = tf.math.top_k(tf.squeeze(tf.cast(fake_logits, tf.float32), -1), k=kept).indices
    replicas = global_batch_size // batch
    return tf.gather(real_logits, strongest), tf.gather(fake_logits, strongest), kept * replicas


def translate(images, shifts):
    """Each image moved by whole pixels, the uncovered border filled with the background (-1).

    images float [b, 28, 28, 1] in [-1, 1]; shifts int32 [b, 2], (dx, dy) per image (right, down).
    Returns float32 [b, 28, 28, 1]; no gradient flows back to the images. Gathers, so XLA compiles it.
    """
    images = tf.stop_gradient(tf.cast(images, tf.float32))
    size = tf.shape(images)[1]
    positions = tf.range(size)[None, :]
    # Output row y reads input row y - dy, column x reads x - dx; outside the image is background.
    source_rows, source_columns = positions - shifts[:, 1:2], positions - shifts[:, 0:1]
    moved = tf.gather(images, tf.clip_by_value(source_rows, 0, size - 1), axis=1, batch_dims=1)
    moved = tf.gather(moved, tf.clip_by_value(source_columns, 0, size - 1), axis=2, batch_dims=1)
    inside = ((source_rows >= 0) & (source_rows < size))[:, :, None] & \
        ((source_columns >= 0) & (source_columns < size))[:, None, :]
    return tf.where(inside[..., None], moved, -1.0)


def consistency_penalty(logits, moved_logits, global_batch_size: int):
    """bCR's term (Zhao et al. 2021): Σ over the batch of (D(x) - D(T(x)))² / global batch. Logits [b, 1]."""
    difference = tf.cast(logits, tf.float32) - tf.cast(moved_logits, tf.float32)
    return tf.nn.compute_average_loss(tf.squeeze(tf.square(difference), -1), global_batch_size=global_batch_size)


# MNIST placed every digit with its centre of mass on this pixel (row and column, counting from 0).
MNIST_CENTRE = 14.0


def centring_penalty(images, global_batch_size: int):
    """Σ over the batch of each image's squared distance, in pixels, from its centre of mass to MNIST_CENTRE,
    divided by the global batch. images float [b, 28, 28, 1] in [-1, 1] (ink is (x + 1) / 2)."""
    ink = (tf.cast(images[..., 0], tf.float32) + 1.0) / 2.0
    mass = tf.reduce_sum(ink, axis=[1, 2]) + 1e-3
    positions = tf.range(tf.shape(ink)[1], dtype=tf.float32)
    row = tf.reduce_sum(tf.reduce_sum(ink, axis=2) * positions, axis=1) / mass
    column = tf.reduce_sum(tf.reduce_sum(ink, axis=1) * positions, axis=1) / mass
    per_example = tf.square(row - MNIST_CENTRE) + tf.square(column - MNIST_CENTRE)
    return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)


def r1_penalty(input_gradients, global_batch_size: int):
    """Σ over the batch of |∇ₓD(x)|² / global batch: E[|∇D|²] of R1 (Mescheder et al. 2018), before its γ/2.

    input_gradients float32 [b, 28, 28, 1]: the gradient of D's logit w.r.t. each real image.
    """
    per_example = tf.reduce_sum(tf.square(input_gradients), axis=[1, 2, 3])
    return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
