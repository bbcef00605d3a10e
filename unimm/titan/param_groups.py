"""Which role each parameter plays: the one mapping from parameter names to groups.

Staged training (``unimm.titan.stage``: freezing, per-group learning rates) names parameters
by these groups, so every rule lives here:

- ``embeddings``: the token embedding (``tok_embeddings``).
- ``backbone``: what every token shares: attention projections, the norms (the final one
  included), a shared FFN (``ffn.kind = "shared"``).
- ``text``, ``vision``: modality-specific parts: the text and the vision FFN of a modality FFN
  (experts 0 and 1 of its stacked weights), a MoE's ``per_modality`` shared experts (experts 0
  and 1), and the modules of a Mixture-of-Transformers branch (below).
- ``experts``: a MoE's routers and its other experts (the routed ones and a ``global`` shared
  expert).
- ``lm_head``, ``flow_head``: the two output heads.
- ``latent_proj``, ``time_embedding``, ``understanding_proj``: the visual adapters (latent input
  projection, timestep MLP, a dual encoder's understanding projection).

Names that select several groups: ``heads`` (``lm_head``, ``flow_head``), ``adapters``
(``latent_proj``, ``time_embedding``, ``understanding_proj``), ``modality`` (``text``,
``vision``).

A modality FFN (and a ``per_modality`` MoE) keeps text and vision experts in one stacked
tensor ``[E, ...]``, and a Mixture of Transformers stacks its per-modality projections and
norms (the final norm included) as ``[2, ...]``; such a tensor is split by rows of dim 0
(``Part.rows``), so text and vision are separate groups even there.

Mixture of Transformers, or any new per-modality module: a module with an attribute
``param_group = "text"`` (or ``"vision"``, or any group above) puts all its parameters in that
group; without it, a module path component named ``text`` / ``vision`` (or ``text_*``,
``*_text``, ``vision_*``, ``*_vision``) inside a layer marks a modality branch. A parameter
outside ``layers`` that no rule knows is an error (add it to ``TOP_LEVEL``), never a silent
guess.

Names are the model's own: wrapper segments that torchtitan and torch add
(``_checkpoint_wrapped_module`` of activation checkpointing, ``_orig_mod`` of a
``torch.compile`` wrapper, ``_fsdp_wrapped_module``) are dropped first; FSDP2 adds none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from unimm.errors import ConfigError

GROUPS = (
    "embeddings",
    "backbone",
    "text",
    "vision",
    "experts",
    "lm_head",
    "flow_head",
    "latent_proj",
    "time_embedding",
    "understanding_proj",
)
"""Every group a parameter (or a row range of a stacked one) can belong to."""

ALIASES: dict[str, tuple[str, ...]] = {
    "heads": ("lm_head", "flow_head"),
    "adapters": ("latent_proj", "time_embedding", "understanding_proj"),
    "modality": ("text", "vision"),
}
"""Names that stand for several groups."""

TOP_LEVEL = {
    "tok_embeddings": "embeddings",
    "norm": "backbone",
    "lm_head": "lm_head",
    "flow_head": "flow_head",
    "latent_proj": "latent_proj",
    "time_embedding": "time_embedding",
    "understanding_proj": "understanding_proj",
}
"""Group of each top-level module other than ``layers``."""

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
MODALITIES = ("text", "vision")  # modality ids TEXT=0, VISION=1 (unimm.data.batch): expert rows 0 and 1


@dataclass(frozen=True)
class Part:
    """A group's share of one parameter: all of it (``rows`` None) or rows of dim 0."""

    group: str
    rows: tuple[int, ...] | None = None


def canonical_name(name: str) -> str:
    """``name`` without wrapper segments (``layers.0._checkpoint_wrapped_module.attention.wq.weight``
    -> ``layers.0.attention.wq.weight``)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def expand(names: Iterable[str]) -> set[str]:
    """The groups that group names and aliases select; unknown names are a ConfigError."""
    groups: set[str] = set()
    for name in names:
        if name in ALIASES:
            groups.update(ALIASES[name])
        elif name in GROUPS:
            groups.add(name)
        else:
            aliases = ", ".join(f"{alias} ({' '.join(groups)})" for alias, groups in ALIASES.items())
            raise ConfigError(f"unknown parameter group {name!r}; groups: {', '.join(GROUPS)}; aliases: {aliases}")
    return groups


def _modality_in_path(components: list[str]) -> str | None:
    for part in components:
        for modality in MODALITIES:
            if part == modality or part.startswith(f"{modality}_") or part.endswith(f"_{modality}"):
                return modality
    return None


def _stacked_expert_parts(owner: nn.Module, num_rows: int) -> tuple[Part, ...] | None:
    """Row groups of an FFN's stacked expert tensor [E, ...]; None if ``owner`` is no known FFN."""
    from unimm.model.ffn import ModalityFFN
    from unimm.model.moe import MoE

    if isinstance(owner, ModalityFFN):
        return tuple(Part(m, (i,)) for i, m in enumerate(MODALITIES))
    if isinstance(owner, MoE):
        if owner.config.shared == "per_modality":
            return (Part("text", (0,)), Part("vision", (1,)), Part("experts", tuple(range(2, num_rows))))
        return (Part("experts"),)
    return None


def _per_modality_rows(owner: nn.Module) -> tuple[Part, ...] | None:
    """A Mixture-of-Transformers weight stacked per modality [2, ...]: row 0 text, row 1 vision."""
    from unimm.model.mot import ModalityLinear, ModalityRMSNorm

    if isinstance(owner, (ModalityLinear, ModalityRMSNorm)):
        return tuple(Part(m, (i,)) for i, m in enumerate(MODALITIES))
    return None


def _layer_parts(components: list[str], chain: list[nn.Module], param) -> tuple[Part, ...]:
    """Parts of a parameter inside ``layers``; ``chain``: its modules from the block down to
    the owner."""
    from unimm.model.experts import ExpertWeights
    from unimm.model.moe import MoE, Router

    per_modality = _per_modality_rows(chain[-1])
    if per_modality is not None:
        return per_modality
    for module in reversed(chain):
        declared = getattr(module, "param_group", None)
        if isinstance(declared, str):
            if declared not in GROUPS:
                raise ConfigError(f"{type(module).__name__}.param_group = {declared!r} is not a group of {GROUPS}")
            return (Part(declared),)
    owner = chain[-1]
    if isinstance(owner, ExpertWeights) and len(chain) >= 2:
        parts = _stacked_expert_parts(chain[-2], param.shape[0])
        if parts is not None:
            return parts
    if any(isinstance(m, Router) for m in chain) or (isinstance(owner, MoE)):
        return (Part("experts"),)
    modality = _modality_in_path(components)
    if modality is not None:
        return (Part(modality),)
    return (Part("backbone"),)


def parameter_parts(model: nn.Module) -> dict[str, tuple[Part, ...]]:
    """For every parameter of ``model`` (its own ``named_parameters`` names, wrappers
    included), the groups it belongs to: one whole-tensor Part, or row ranges that together
    cover dim 0 exactly once."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out: dict[str, tuple[Part, ...]] = {}
    for name, param in model.named_parameters():
        raw = name.split(".")
        # the modules on the path (wrappers included), from the root's child down to the owner
        chain = [modules[".".join(raw[:i])] for i in range(1, len(raw))]
        components = canonical_name(name).split(".")
        top = components[0]
        if top == "layers":
            block_depth = next(i for i, part in enumerate(raw) if part == "layers") + 2
            out[name] = _layer_parts(components[2:-1], chain[block_depth - 1 :], param)
        elif top in TOP_LEVEL and len(components) > 1:
            out[name] = _per_modality_rows(chain[-1]) or (Part(TOP_LEVEL[top]),)
        else:
            raise ConfigError(
                f"parameter {canonical_name(name)!r} belongs to no parameter group: add its module to "
                "unimm.titan.param_groups.TOP_LEVEL (or give the module a param_group attribute)"
            )
    return out


def group_sizes(model: nn.Module) -> dict[str, int]:
    """Elements per group (a stacked tensor's rows counted in their own groups)."""
    sizes = dict.fromkeys(GROUPS, 0)
    params = dict(model.named_parameters())
    for name, parts in parameter_parts(model).items():
        param = params[name]
        per_row = param.numel() // param.shape[0] if param.dim() else param.numel()
        for part in parts:
            sizes[part.group] += param.numel() if part.rows is None else per_row * len(part.rows)
    return sizes
