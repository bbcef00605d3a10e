"""Which architecture a DCP checkpoint holds.

A DCP folder stores tensors, not the trainer's configuration. The architecture and tokenizer
come from the recipe the run was trained with (``--recipe NAME`` plus the same
``--section.key VALUE`` options given to `unimm train`, e.g. ``--tokenizer.path``) or, without
one, from the registered model flavor whose tensors have exactly the checkpoint's names and
shapes. Either way every tensor is checked, so a wrong recipe, or an architecture no flavor
describes, stops with the names that differ.

The tokenizer must be the run's. Shards hold token ids, and their manifest.json records the
tokenizer that wrote them (kind, path, fingerprint, vocabulary size, special ids: see
`unimm.tokenizer.Tokenizer.describe`), so with ``--dataloader.shards`` (in the recipe or as an
option) the export's tokenizer must be that one. A run on procedural data records nothing, and
then a tokenizer is only accepted when it fills the model's vocabulary exactly, so that the
byte tokenizer is not written into a model trained with a larger vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from unimm.errors import ConfigError
from unimm.model.params import meta_model
from unimm.model.transformer import UnimmModel
from unimm.titan.model_spec import FLAVORS
from unimm.tokenizer import Tokenizer

Shapes = dict[str, tuple[int, ...]]
EMBEDDING = "tok_embeddings.weight"  # [vocab_size, dim]


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


def checkpoint_differences(path: Path, model: UnimmModel.Config, limit: int = 3) -> str:
    """How the model tensors of the DCP checkpoint at ``path`` differ from ``model``'s, summed up
    ("" when they match). Other saved states (loss centering, ...) are not model tensors and are
    left out."""
    from unimm.convert.dcp_io import DcpCheckpoint
    from unimm.titan.param_groups import TOP_LEVEL

    expected = tensor_shapes(model)
    tops = {name.split(".")[0] for name in expected} | set(TOP_LEVEL)
    found = {k: v for k, v in DcpCheckpoint(path).shapes().items() if k.split(".")[0] in tops}
    differences = shape_differences(expected, found)
    return _summary(differences, limit) if differences else ""


def check_shapes(model: UnimmModel.Config, found: Shapes, where: Path, source: str) -> None:
    differences = shape_differences(tensor_shapes(model), found)
    if differences:
        rows = found.get(EMBEDDING, (model.vocab_size,))[0]
        hint = (
            f" (the checkpoint has {rows} token ids, this model {model.vocab_size}: the vocabulary is the recipe's, "
            "--model_size.vocab_size, or in a recipe fitted to its data the tokenizer's, --tokenizer.path)"
            if rows != model.vocab_size
            else ""
        )
        raise ConfigError(f"{where} does not hold the architecture of {source}: {_summary(differences)}{hint}")


def flavor_differences(found: Shapes) -> dict[str, list[str]]:
    """For each registered model flavor, how its tensors differ from ``found`` (empty: a match)."""
    return {name: shape_differences(tensor_shapes(make()), found) for name, make in FLAVORS.items()}


def _from_recipe(recipe: str, overrides: list[str]) -> tuple[UnimmModel.Config, Tokenizer.Config, str]:
    from unimm.titan.launch import load_recipe

    config = load_recipe(recipe, overrides)
    return config.model_spec.model, config.tokenizer, config.dataloader.shards


def _describe(kind: str, path: str, size, special_ids, fingerprint) -> str:
    ids = ", ".join(f"{name} {i}" for name, i in (special_ids or {}).items())
    name = f"{kind} tokenizer {path!r}" if path else f"the {kind} tokenizer"
    return f"{name} ({size} ids; special ids {ids}; fingerprint {fingerprint})"


def _recorded_tokenizer(shards: str) -> tuple[Path, dict]:
    """The tokenizer record of the shards' manifest.json (only the manifest is read)."""
    path = Path(shards).expanduser() / "manifest.json"
    try:
        info = json.loads(path.read_text())
    except OSError:
        raise ConfigError(
            f"dataloader.shards {shards!r}: cannot read {path}, which records the tokenizer the run's shards "
            "were written with; pass --dataloader.shards with the run's shard folder (a folder holding only "
            "its manifest.json will do)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a manifest ({exc})") from None
    record = info.get("tokenizer") if isinstance(info, dict) else None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} records no tokenizer; regenerate the shards with unimm.data_pipelines")
    return path, record


def check_recorded_tokenizer(config: Tokenizer.Config, shards: str) -> None:
    """``config`` must be the tokenizer ``shards`` were written with: the same fingerprint
    (vocabulary file and special ids), vocabulary size and special ids, as far as recorded."""
    path, record = _recorded_tokenizer(shards)
    tokenizer = Tokenizer(config)
    found = {
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.get_vocab_size(),
        "special_ids": tokenizer.special_ids,
    }
    differ = [key for key, value in found.items() if record.get(key) is not None and record[key] != value]
    if not differ:
        return
    expected = _describe(
        record.get("kind", "?"), record.get("path", "?"), record.get("vocab_size", "?"), record.get("special_ids"),
        record.get("fingerprint", "?"),
    )
    given = _describe(
        tokenizer.vocabulary.kind, config.path, found["vocab_size"], found["special_ids"], found["fingerprint"]
    )
    option = f"--tokenizer.path {record['path']}" if record.get("path") else "no --tokenizer.path (the byte tokenizer)"
    raise ConfigError(
        f"{path} (dataloader.shards): the run's shards were written with {expected}, but the tokenizer to export "
        f"(--tokenizer.path {config.path!r}) is {given}; {', '.join(differ)} differ. Pass the tokenizer the run "
        f"was trained with: {option}, with the --tokenizer.* pieces it was given"
    )


def check_tokenizer_fits(model: UnimmModel.Config, config: Tokenizer.Config, shards: str, where: Path) -> None:
    """The tokenizer's ids must fit the model; without shards to vouch for it, fill it exactly."""
    size = Tokenizer(config).get_vocab_size()
    name = f"--tokenizer.path {config.path!r}" if config.path else "the byte tokenizer (no --tokenizer.path)"
    if size > model.vocab_size or (size != model.vocab_size and not shards):
        why = (
            "more than the model"
            if size > model.vocab_size
            else "and nothing records the tokenizer the run used (dataloader.shards is empty)"
        )
        raise ConfigError(
            f"{where}: the model has {model.vocab_size} token ids but {name} has {size}, {why}; pass the run's "
            "--tokenizer.path and --tokenizer.* options, and its --dataloader.shards (their manifest.json "
            "records the tokenizer the shards were written with)"
        )


def resolve_architecture(found: Shapes, where: Path, recipe: str | None, overrides: list[str]) -> Architecture:
    """``overrides`` (--section.key VALUE) apply to ``recipe``."""
    if recipe is not None:
        model, tokenizer, shards = _from_recipe(recipe, overrides)
        source = " ".join(["recipe", recipe, *overrides])
        if shards:  # first: a recipe fitted to its data takes its vocabulary from the tokenizer
            check_recorded_tokenizer(tokenizer, shards)
        check_shapes(model, found, where, source)
        check_tokenizer_fits(model, tokenizer, shards, where)
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
