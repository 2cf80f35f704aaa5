"""Keras's mixed-precision policy is process-global; these scope it, so what one part of a process
sets (a bfloat16 training run, a test) does not leak into what another builds (a judge, a bundle)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def keras_policy(name: str):
    """Inside, new Keras layers compute under the global policy `name` (e.g. "float32",
    "mixed_bfloat16"); whatever policy was set before is back afterwards, also after an error or
    after code inside set another one (`trainer.step.set_globals_and_build_state` does)."""
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def float32_policy():
    """`keras_policy("float32")`: judges and exported generators must not inherit a training run's bfloat16."""
    return keras_policy("float32")
