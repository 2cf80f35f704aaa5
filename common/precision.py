"""Keras's mixed-precision policy is process-global; this builds models in float32 regardless of it."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def float32_policy():
    """Inside, new Keras layers compute in float32, whatever policy a training run in this process set;
    the previous policy is back afterwards. Judges and exported generators must not inherit bfloat16."""
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
