"""Model-family registry: what slimtune needs to know about a family, as data.

Adding a family is one small file that builds a `ModelFamily` and calls `register_family`. The loader picks the
family from `config.json`'s `model_type`; LoRA injection reads the family's module names instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimtune.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelFamily:
    """Names and classes slimtune relies on for one model family.

    Attributes:
        name: short family name used in messages (e.g. "gemma4").
        model_types: `config.model_type` values that belong to this family.
        causal_class: transformers class name for text-only checkpoints.
        multimodal_class: transformers class name for checkpoints with towers (None if the family has none).
        language_prefixes: module-name prefixes of the text decoder layers (first match wins).
        tower_prefixes: component name ("vision", "audio") -> module-name prefix of that tower.
        attention_modules: linear names inside attention blocks (text and towers).
        mlp_modules: linear names inside MLP / feed-forward / conv blocks (text and towers).
        wrapper_classes: class names of modules that wrap an inner `.linear` (LoRA goes on the inner one).
        embedder_prefixes: module-name prefixes of the projections from tower outputs into the text model.
    """

    name: str
    model_types: tuple[str, ...]
    causal_class: str
    multimodal_class: str | None
    language_prefixes: tuple[str, ...]
    tower_prefixes: dict[str, str] = field(default_factory=dict)
    attention_modules: tuple[str, ...] = ()
    mlp_modules: tuple[str, ...] = ()
    wrapper_classes: tuple[str, ...] = ()
    embedder_prefixes: tuple[str, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family known to the loader; returns it so a module can keep a handle."""
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def family_for_model_type(model_type: str | None) -> ModelFamily:
    """Return the family of a `config.model_type`.

    Raises:
        UnsupportedModelError: the model type belongs to no registered family.
    """
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    known = sorted(_FAMILIES)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported by slimtune; supported model types: {known}. "
        "Check that the folder's config.json is a Gemma 4 checkpoint."
    )


def family_of(model) -> ModelFamily:
    """Return the family of an instantiated transformers model."""
    return family_for_model_type(getattr(model.config, "model_type", None))
