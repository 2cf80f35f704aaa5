"""configs/recipes.py: the named recipes, and `--set FIELD=VALUE` read as each field's type."""
from __future__ import annotations

import dataclasses
import re

import pytest

from common import field_docs
from configs import recipes
from trainer.config import TrainConfig, recipe


def test_every_named_recipe_builds_a_valid_config():
    for name in recipes.names():
        assert isinstance(recipes.build(name, run_dir="runs/x"), TrainConfig), name
    assert recipes.build("default") == TrainConfig()  # the default recipe is TrainConfig's defaults, nothing else


@pytest.mark.parametrize("name", ["previous_default", "tanh_default"])
def test_former_defaults_spell_out_every_recipe_field(name):
    """A field left out would follow today's default, so the old recipe would change with it."""
    learned = set(recipe(TrainConfig()))
    assert learned <= set(recipes.overrides(name)), learned - set(recipes.overrides(name))
    assert recipes.build(name) != TrainConfig()  # a different recipe, not today's twice


def test_tanh_default_trains_with_tanh():
    assert recipes.build("tanh_default").image_activation == "tanh"


def test_tutorial_is_the_tensorflow_tutorials_recipe():
    tutorial = recipes.build("tutorial")
    assert (tutorial.conditional, tutorial.batch_size, tutorial.learning_rate, tutorial.beta_1, tutorial.epochs) == (
        False, 256, 1e-4, 0.9, 50)
    assert (tutorial.architecture, tutorial.precision, tutorial.generator_average_decay) == ("tutorial", "float32", 0.0)


def test_settings_are_read_as_their_fields_types():
    assert recipes.parse_settings(["epochs=3", "learning_rate=1e-3", "conditional=false", "xla=TRUE",
                                   "architecture=compact", "discriminator_learning_rate=none", "max_steps=7",
                                   "max-steps=8"]) == {
        "epochs": 3, "learning_rate": 1e-3, "conditional": False, "xla": True, "architecture": "compact",
        "discriminator_learning_rate": None, "max_steps": 8}  # the later pair for a field wins; - reads as _


@pytest.mark.parametrize("pair, message", [
    ("epochs", "--set takes FIELD=VALUE, like epochs=3; got 'epochs'"),
    ("=3", "--set takes FIELD=VALUE"),
    ("epoch=3", "no training field is called 'epoch' (did you mean epochs?)"),
    ("epochs=3.5", "epochs takes a whole number"),
    ("epochs=none", "epochs takes a whole number"),  # not an optional field
    ("learning_rate=fast", "learning_rate takes a number"),
    ("max_steps=lots", "max_steps takes a whole number or none"),
    ("conditional=maybe", "conditional takes true or false"),
])
def test_a_bad_setting_is_a_value_error_that_quotes_it(pair, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        recipes.parse_settings([pair])


def test_an_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown recipe 'fast'; choose from default, previous_default, tanh_default, tutorial"):
        recipes.build("fast")


def test_every_train_config_field_has_exactly_one_docstring():
    """The CLI's help comes from these docstrings: a field without one would have no help."""
    docs = field_docs.field_docs(TrainConfig)
    assert set(docs) == {field.name for field in dataclasses.fields(TrainConfig)}
    assert all(docs.values())
    described = recipes.describe_fields()
    assert [name for name, _, _ in described] == [field.name for field in dataclasses.fields(TrainConfig)]
    assert ("epochs", str(TrainConfig().epochs), docs["epochs"]) in described
