"""Which architecture a DCP checkpoint holds.

A DCP folder stores tensors, not the trainer's configuration. The architecture and tokenizer
come from the recipe the run was trained with (``--recipe NAME`` plus the same
``--section.key VALUE`` options given to `unimm train`, e.g. ``--tokenizer.path``) or, without
one, from the registered model flavor whose tensors have exactly the checkpoint's names and
shapes. Either way every tensor is checked, so a wrong recipe, or an architecture no flavor
describes, stops with the names that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unimm.errors import ConfigError
from unimm.model.params import meta_model
from unimm.model.transformer import UnimmModel
from unimm.titan.model_spec import FLAVORS
from unimm.tokenizer import Tokenizer

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Architecture:
    model: UnimmModel.Config
    tokenizer: Tokenizer.Config
    source: str
    """How it was found, for messages and the model card."""


def tensor_shapes(model: UnimmModel.Config) -> Shapes:
    return {name: tuple(t.shape) for name, t in meta_model(model).state_dict().items()}


def shape_differences(expected: Shapes, found: Shapes) -> list[str]:
    return (
        [f"missing {name}" for name in sorted(expected.keys() - found.keys())]
        + [f"unexpected {name}" for name in sorted(found.keys() - expected.keys())]
        + [
            f"{name} is {list(found[name])}, expected {list(expected[name])}"
            for name in sorted(expected.keys() & found.keys())
            if found[name] != expected[name]
        ]
    )


def _summary(differences: list[str], limit: int = 3) -> str:
    more = f"; {len(differences) - limit} more" if len(differences) > limit else ""
    return "; ".join(differences[:limit]) + more


def check_shapes(model: UnimmModel.Config, found: Shapes, where: Path, source: str) -> None:
    differences = shape_differences(tensor_shapes(model), found)
    if differences:
        raise ConfigError(f"{where} does not hold the architecture of {source}: {_summary(differences)}")


def flavor_differences(found: Shapes) -> dict[str, list[str]]:
    """For each registered model flavor, how its tensors differ from ``found`` (empty: a match)."""
    return {name: shape_differences(tensor_shapes(make()), found) for name, make in FLAVORS.items()}


def _from_recipe(recipe: str, overrides: list[str]) -> tuple[UnimmModel.Config, Tokenizer.Config]:
    from unimm.titan.launch import load_recipe

    config = load_recipe(recipe, overrides)
    return config.model_spec.model, config.tokenizer


def resolve_architecture(found: Shapes, where: Path, recipe: str | None, overrides: list[str]) -> Architecture:
    """``overrides`` (--section.key VALUE) apply to ``recipe``."""
    if recipe is not None:
        model, tokenizer = _from_recipe(recipe, overrides)
        source = " ".join(["recipe", recipe, *overrides])
        check_shapes(model, found, where, source)
        return Architecture(model, tokenizer, source)

    differences = flavor_differences(found)
    names = [name for name, diff in differences.items() if not diff]
    if not names:
        closest = min(differences, key=lambda name: len(differences[name]))
        raise ConfigError(
            f"{where}: the checkpoint matches no known architecture (closest, flavor {closest!r}: "
            f"{_summary(differences[closest])}); pass the --recipe NAME and --section.key VALUE options "
            "(e.g. --model_size.*) it was trained with"
        )
    if any(FLAVORS[name]() != FLAVORS[names[0]]() for name in names[1:]):
        # Same tensors, different non-tensor settings (RoPE base, routing): only the run knows.
        raise ConfigError(f"{where}: the checkpoint fits flavors {', '.join(names)}; pass --recipe NAME")
    model = FLAVORS[names[0]]()
    # Without the recipe the tokenizer is a guess, the byte one: accept it only if it fills
    # the vocabulary exactly, so that a model trained with a larger one is not mislabelled.
    if (size := Tokenizer(Tokenizer.Config()).get_vocab_size()) != model.vocab_size:
        raise ConfigError(
            f"{where}: the model has {model.vocab_size} token ids, the byte tokenizer {size}; pass "
            "the --recipe NAME and --tokenizer.* options it was trained with"
        )
    return Architecture(model, Tokenizer.Config(), f"model flavor {names[0]!r}, recognised by its tensors")
