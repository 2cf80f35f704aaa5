"""The Keras policy scope: what code inside sets is undone, also after an error."""
from __future__ import annotations

import keras
import pytest

from common import precision


def test_keras_policy_scopes_the_global_policy_and_restores_it_after_an_error():
    assert keras.mixed_precision.global_policy().name == "float32"  # tests start in float32 (conftest)
    with pytest.raises(RuntimeError):
        with precision.keras_policy("mixed_bfloat16"):
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            keras.mixed_precision.set_global_policy("mixed_float16")  # as step.set_globals_and_build_state does
            raise RuntimeError("inside")
    assert keras.mixed_precision.global_policy().name == "float32"
    with precision.keras_policy("mixed_bfloat16"), precision.float32_policy():
        assert keras.layers.Dense(1).compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
