"""Named training recipes: each is the TrainConfig fields in which it differs from the defaults.

`python cli.py train --config NAME --set field=value ...` builds its config here, and so do the
benches, so a recipe is written once. How each recipe judged and how fast it ran is in
docs/experiments.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Iterable

from trainer import config as config_lib

RECIPES: dict[str, dict] = {
    # The project's default recipe: TrainConfig's own field defaults.
    "default": {},
    # The default before the 3x3 recipe: 5x5 kernels with conditional BatchNorm, 8 epochs, the
    # tutorial's dropout in D. Every recipe field is spelled out, so a new default cannot shift it.
    "previous_default": dict(
        epochs=8, batch_size=64, learning_rate=2e-4, discriminator_learning_rate=None,
        learning_rate_schedule="linear_decay", learning_rate_decay_start=0.5, beta_1=0.5, beta_2=0.999,
        latent_dim=100, conditional=True, classifier_weight=0.15, discriminator_dropout=0.3,
        architecture="tutorial_cbn", generator_average_decay=0.999, max_steps=None, seed=0, loss="bce",
        spectral_norm=False, r1_gamma=0.0, r1_interval=16, minibatch_std=False, generator_average_rampup=0.0,
        twin_classifier=0.0, classifier_confidence=0.0, image_activation="tanh", mode_seeking=0.0,
        generator_average_interval=1, generator_top_k=1.0, consistency=0.0, consistency_shift=2, centring=0.0),
    # The default before G's image activation became hard_tanh: the same recipe with tanh. Every
    # recipe field is spelled out, so a new default cannot shift it.
    "tanh_default": dict(
        epochs=6, batch_size=64, learning_rate=5e-4, discriminator_learning_rate=None,
        learning_rate_schedule="linear_decay", learning_rate_decay_start=0.5, beta_1=0.5, beta_2=0.999,
        latent_dim=100, conditional=True, classifier_weight=0.6, twin_classifier=0.0, classifier_confidence=0.0,
        discriminator_dropout=0.0, architecture="tutorial_cbn_3x3", image_activation="tanh", loss="bce",
        spectral_norm=False, r1_gamma=0.0, r1_interval=16, minibatch_std=False, max_steps=None, seed=0,
        generator_average_decay=0.999, generator_average_rampup=0.0, mode_seeking=0.0, generator_average_interval=1,
        generator_top_k=1.0, consistency=0.0, consistency_shift=2, centring=0.0),
    # TensorFlow's DCGAN tutorial: unconditional, batch 256, Adam(1e-4) with beta_1 0.9, 50 epochs,
    # float32, no schedule and no moving average.
    "tutorial": dict(
        epochs=50, batch_size=256, learning_rate=1e-4, beta_1=0.9, learning_rate_schedule="constant",
        conditional=False, classifier_weight=0.0, discriminator_dropout=0.3, architecture="tutorial",
        generator_average_decay=0.0, precision="float32", evaluate_every_epoch=False),
}

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def names() -> tuple[str, ...]:
    return tuple(RECIPES)


def overrides(name: str) -> dict:
    """The fields recipe `name` sets; ValueError for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def parse_settings(pairs: Iterable[str]) -> dict:
    """["epochs=3", "precision=float32", ...] → {"epochs": 3, "precision": "float32", ...}.

    Each value is read as its TrainConfig field's type (int, float, bool, str; "none" where the
    field may be None); a later pair for the same field wins. ValueError quotes a bad pair.
    """
    types_by_field = typing.get_type_hints(config_lib.TrainConfig)
    settings = {}
    for pair in pairs:
        field, separator, text = pair.partition("=")
        field = field.strip().replace("-", "_")
        if not separator or not field:
            raise ValueError(f"--set takes FIELD=VALUE, like epochs=3; got {pair!r}")
        if field not in types_by_field:
            near = difflib.get_close_matches(field, types_by_field, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"--set {pair}: no training field is called {field!r}{hint}; "
                             "`python cli.py train --help` lists them")
        settings[field] = _read_value(field, text.strip(), types_by_field[field])
    return settings


def build(name: str = "default", settings: dict | None = None, **run_fields) -> config_lib.TrainConfig:
    """The TrainConfig of recipe `name`, then `settings` (from parse_settings), then `run_fields` on top."""
    return config_lib.TrainConfig(**{**overrides(name), **(settings or {}), **run_fields})


def _read_value(field: str, text: str, annotation) -> object:
    """`text` as a value of `annotation` (int, float, bool, str, or one of them | None)."""
    choices = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in choices and text.lower() in ("none", "null"):
        return None
    kind = next(choice for choice in choices if choice is not type(None))
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"--set {field}={text}: {field} takes true or false")
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        description = "a whole number" if kind is int else "a number"
        optional = " or none" if type(None) in choices else ""
        raise ValueError(f"--set {field}={text}: {field} takes {description}{optional}") from None


def describe_fields() -> list[tuple[str, str, str]]:
    """(field, default, docstring) for every TrainConfig field, in the order they are defined."""
    from common import field_docs

    docs = field_docs.field_docs(config_lib.TrainConfig)
    defaults = config_lib.TrainConfig()
    return [(field.name, _show(getattr(defaults, field.name)), docs.get(field.name, ""))
            for field in dataclasses.fields(config_lib.TrainConfig)]


def _show(value: object) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
