"""Staged training: freeze parameter groups, give groups their own learning rate, and start a
stage from another run's checkpoint (seed 000, §2.3 and App. D: pretraining with the language
model frozen, then fine-tuning with per-module learning rates).

The groups are ``unimm.titan.param_groups``'s (``embeddings``, ``backbone``, ``text``,
``vision``, ``experts``, ``lm_head``, ``flow_head``, the adapters, and the aliases ``heads``,
``adapters``, ``modality``).

Freezing (``--stage.freeze embeddings,backbone``). A frozen parameter gets
``requires_grad = False`` before the optimizer is built: it gets no gradient, torchtitan's
optimizer container leaves it out (so no update and no weight decay), FSDP2 reduces no gradient
for it, and it adds nothing to the gradient norm. A stacked tensor that holds a frozen and a
trainable group (the modality FFN's text and vision experts, a ``per_modality`` MoE's shared
experts) stays in the optimizer; its frozen rows are zeroed in the gradient as soon as the
gradient is complete (a post-accumulate-grad hook, which FSDP2 also calls after its
reduce-scatter, so the gradient norm and the optimizer's moments never see them), and are saved
before and written back after every optimizer step, so weight decay cannot move them either:
they stay bitwise equal. A MoE whose routers are frozen also stops its aux-loss-free bias
updates.

Learning rates (``--stage.lr_multipliers heads 10 adapters 5``). Each of the optimizer
config's param groups (torchtitan's regex ``param_groups``, first match wins) is split by
multiplier into torch param groups with ``lr = base lr * multiplier``. torchtitan's
``LambdaLR`` scales each group's own initial lr by the schedule, so the ratios hold at every
step; the logged ``lr`` is that of the first group, which is a group at multiplier 1 whenever
there is one. Text and vision rows of one stacked tensor must share a multiplier (one tensor
has one learning rate). Without ``--stage.*`` the optimizer is torchtitan's exactly.

Checkpoints. The optimizer state is saved per parameter name (torchtitan's flat DCP state),
so a resumed stage restores it exactly; the split into groups is rebuilt from the config.

Starting a stage (``--stage.init_from RUN_OR_CHECKPOINT``): the newest complete ``step-N`` of
a run folder (or of its ``checkpoint/`` folder, or a ``step-N`` folder itself), as an absolute
path, becomes torchtitan's ``--checkpoint.initial_load_path`` with
``--checkpoint.initial_load_model_only``: the weights are loaded, while the optimizer, LR
schedule, step and data position start afresh. As with torchtitan, it only applies while the
run's own checkpoint folder is empty; later launches resume the run itself. Any DCP
``initial_load_path`` is checked against this run's model first, so a checkpoint of another
architecture stops the run with the tensors that differ.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

from unimm.errors import ConfigError
from unimm.titan.param_groups import GROUPS, canonical_name, expand, group_sizes, parameter_parts


@dataclass(kw_only=True, slots=True)
class StageConfig:
    freeze: list[str] = field(default_factory=list)
    """Parameter groups that do not train in this stage (``--stage.freeze embeddings,backbone``;
    torchtitan's command line takes a list comma-separated): embeddings, backbone, text, vision, experts,
    lm_head, flow_head, latent_proj, time_embedding, understanding_proj, or the aliases heads,
    adapters, modality (unimm.titan.param_groups)."""

    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Learning rate of a group as a multiple of the optimizer's
    (``--stage.lr_multipliers heads 10 adapters 5``); a group name beats an alias holding it."""

    init_from: str = ""
    """Start from another run's weights: a run folder (its newest complete checkpoint), a
    checkpoint folder, or a ``step-N`` folder; the optimizer, LR schedule and data start afresh.
    Ignored once this run has checkpoints of its own (it then resumes)."""

    def __post_init__(self) -> None:
        self.group_multipliers()  # unknown groups and bad multipliers fail while parsing options

    def frozen_groups(self) -> set[str]:
        return expand(name.strip() for item in self.freeze for name in item.split(",") if name.strip())

    def group_multipliers(self) -> dict[str, float]:
        """Multiplier of every group (1.0 unless given); aliases first, so a group's own entry wins."""
        out = dict.fromkeys(GROUPS, 1.0)
        for name, value in sorted(self.lr_multipliers.items(), key=lambda item: item[0] in GROUPS):
            value = float(value)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(
                    f"--stage.lr_multipliers {name} {value}: a multiplier must be positive and finite "
                    "(to stop a group from training, freeze it: --stage.freeze)"
                )
            for group in expand([name]):
                out[group] = value
        frozen = self.frozen_groups()
        pointless = [name for name in self.lr_multipliers if expand([name]) <= frozen]
        if pointless:
            raise ConfigError(f"--stage.lr_multipliers names frozen groups {pointless} (--stage.freeze): drop one")
        return out

    @property
    def active(self) -> bool:
        return bool(self.frozen_groups() or self.lr_multipliers)


# -- freezing ----------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _local_row_range(param: torch.Tensor) -> tuple[int, int]:
    """Global dim-0 rows [start, stop) that this rank's local tensor of ``param`` holds."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(_local(param).shape) != tuple(shape):
        raise RuntimeError(f"local shard {tuple(_local(param).shape)} of a parameter is not DTensor's {tuple(shape)}")
    return offset[0], offset[0] + shape[0]


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as contiguous [start, stop) runs."""
    runs: list[list[int]] = []
    for row in sorted(rows):
        if runs and runs[-1][1] == row:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    return [(a, b) for a, b in runs]


class FrozenRows:
    """Rows of dim 0 of one trainable parameter that must not change (a frozen group inside a
    stacked tensor): zeroed in the gradient once it is complete, saved before and written back
    after every optimizer step."""

    def __init__(self, name: str, param: nn.Parameter, rows: list[int]) -> None:
        self.name, self.param, self.rows = name, param, sorted(rows)
        start, stop = _local_row_range(param)
        self.slices = [
            slice(max(a, start) - start, min(b, stop) - start) for a, b in _runs(rows) if max(a, start) < min(b, stop)
        ]
        self._saved: list[torch.Tensor] = []
        if self.slices:
            param.register_post_accumulate_grad_hook(self.zero_grad_rows)

    def zero_grad_rows(self, param: torch.Tensor | None = None) -> None:
        grad = self.param.grad
        if grad is not None:
            local = _local(grad)
            for s in self.slices:
                local[s].zero_()

    @torch.no_grad()
    def save(self) -> None:
        local = _local(self.param)
        if len(self._saved) != len(self.slices):
            self._saved = [local[s].clone() for s in self.slices]
        else:
            for buffer, s in zip(self._saved, self.slices):
                buffer.copy_(local[s])

    @torch.no_grad()
    def restore(self) -> None:
        local = _local(self.param)
        for buffer, s in zip(self._saved, self.slices):
            local[s].copy_(buffer)


class StagePlan:
    """What a stage does to the model parts: freezes groups (now) and knows each trainable
    parameter's LR multiplier and any frozen rows it holds."""

    def __init__(self, model_parts: list[nn.Module], stage: StageConfig) -> None:
        self.frozen = stage.frozen_groups()
        self.multipliers = stage.group_multipliers()
        self._multiplier: dict[int, float] = {}
        self._groups: dict[int, tuple[str, ...]] = {}
        self.partial: dict[int, FrozenRows] = {}
        for part_index, model in enumerate(model_parts):
            params = dict(model.named_parameters())
            trainable = 0
            for name, parts in parameter_parts(model).items():
                param = params[name]
                live = [p for p in parts if p.group not in self.frozen]
                if not live:
                    param.requires_grad_(False)
                    continue
                if not param.requires_grad:
                    continue
                trainable += 1
                rates = {self.multipliers[p.group] for p in live}
                if len(rates) > 1:
                    detail = ", ".join(f"{p.group} x{self.multipliers[p.group]:g}" for p in live)
                    raise ConfigError(
                        f"{canonical_name(name)} holds {detail} in one tensor, and one tensor has one learning "
                        "rate: give these groups the same --stage.lr_multipliers"
                    )
                self._multiplier[id(param)] = rates.pop()
                self._groups[id(param)] = tuple(dict.fromkeys(p.group for p in live))
                frozen_rows = [r for p in parts if p.group in self.frozen for r in (p.rows or ())]
                if frozen_rows:
                    self.partial[id(param)] = FrozenRows(canonical_name(name), param, frozen_rows)
            if not trainable:
                raise ConfigError(
                    f"--stage.freeze {','.join(sorted(self.frozen))} freezes every parameter"
                    + (f" of model part {part_index}" if len(model_parts) > 1 else "")
                    + ": nothing would train"
                )
            self._freeze_expert_biases(model)
            self._log(model)

    def multiplier(self, param: torch.Tensor) -> float:
        return self._multiplier[id(param)]

    def groups(self, param: torch.Tensor) -> tuple[str, ...]:
        return self._groups[id(param)]

    @staticmethod
    def _freeze_expert_biases(model: nn.Module) -> None:
        """A MoE whose router is frozen keeps its routing: no aux-loss-free bias updates."""
        from unimm.model.moe import MoE

        for module in model.modules():
            if isinstance(module, MoE) and not module.router.gate.weight.requires_grad:
                if module.config.load_balance == "bias" and module.config.bias_update_rate:
                    module.config = dataclasses.replace(module.config, bias_update_rate=0.0)

    def _log(self, model: nn.Module) -> None:
        sizes = group_sizes(model)
        rows = [
            f"{group} {n / 1e6:.3g}M {'frozen' if group in self.frozen else f'lr x{self.multipliers[group]:g}'}"
            for group, n in sizes.items()
            if n
        ]
        logger.info("Stage: " + "; ".join(rows))


# -- the optimizer -----------------------------------------------------------------------


class StagedOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer with a stage applied: frozen groups out (before the
    container's own build, which leaves out parameters without ``requires_grad``), each regex
    param group split by LR multiplier, frozen rows of stacked tensors kept in place."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        stage: StageConfig = field(default_factory=StageConfig)
        """Copied from the trainer's ``--stage.*`` (UnimmTrainer.Config.stage)."""

    @classmethod
    def adopt(cls, config: OptimizersContainer.Config, stage: StageConfig) -> OptimizersContainer.Config:
        """This container's Config with the values of torchtitan's (recipes build that one)
        and ``stage``; another container's Config is kept, and refused with an active stage."""
        if isinstance(config, cls.Config):
            config.stage = stage
            return config
        if type(config) is not OptimizersContainer.Config:
            if stage.active:
                raise ConfigError(
                    "--stage.freeze / --stage.lr_multipliers need torchtitan's optimizer container, "
                    f"not {type(config).__qualname__}"
                )
            return config
        values = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
        return cls.Config(**values, stage=stage)

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        self.stage_plan = StagePlan(model_parts, config.stage) if config.stage.active else None
        super().__init__(config, model_parts=model_parts)
        if self.stage_plan is not None and self.stage_plan.partial:
            for optimizer in self.optimizers:
                held = [
                    self.stage_plan.partial[id(p)]
                    for group in optimizer.param_groups
                    for p in group["params"]
                    if id(p) in self.stage_plan.partial
                ]
                if held:
                    optimizer.register_step_pre_hook(lambda *_, held=held: _before_step(held))
                    optimizer.register_step_post_hook(lambda *_, held=held: _after_step(held))

    def _build_param_groups(
        self, model: nn.Module, param_group_configs, impl_kwargs: dict[str, Any]
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
        plan = self.stage_plan
        if plan is None:
            return OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        patterns: dict[str, list[str]] = defaultdict(list)
        claimed: set[str] = set()  # first match wins, as in torchtitan
        for pg in param_group_configs:
            pattern = re.compile(pg.pattern)
            matched = False
            buckets: dict[float, tuple[list, list[str], dict[str, None]]] = {}
            for name, param in model.named_parameters():
                if name in claimed or not pattern.search(name):
                    continue
                matched = True
                if not param.requires_grad:
                    continue
                claimed.add(name)
                params, names, roles = buckets.setdefault(plan.multiplier(param), ([], [], {}))
                params.append(param)
                names.append(canonical_fqn(name))
                roles.update(dict.fromkeys(plan.groups(param)))
            if not buckets:
                if matched:
                    logger.info(f"Optimizer param_groups pattern '{pg.pattern}': every parameter it matches is frozen")
                    continue
                raise ValueError(f"Optimizer param_groups pattern '{pg.pattern}' matched no parameters")
            for rate in sorted(buckets, key=lambda r: r != 1.0):  # stable: a group at x1 first
                params, names, roles = buckets[rate]
                kwargs = {**impl_kwargs, **pg.optimizer_kwargs}
                if rate != 1.0:
                    if "lr" not in kwargs:
                        raise ConfigError(f"--stage.lr_multipliers: param group '{pg.pattern}' has no lr to multiply")
                    kwargs["lr"] = kwargs["lr"] * rate
                groups[pg.optimizer_name].append({"params": params, "param_names": names, **kwargs})
                patterns[pg.optimizer_name].append(f"{pg.pattern} [{' '.join(roles)} lr x{rate:g}]")
        return groups, patterns


def _before_step(held: list[FrozenRows]) -> None:
    for rows in held:
        rows.zero_grad_rows()
        rows.save()


def _after_step(held: list[FrozenRows]) -> None:
    for rows in held:
        rows.restore()


# -- where a stage starts ----------------------------------------------------------------

_STEP = re.compile(r"step-(\d+)")


def _dcp_steps(folder: Path) -> list[int]:
    """Steps of the complete DCP ``step-N`` folders in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    steps = [
        int(m.group(1))
        for child in folder.iterdir()
        if (m := _STEP.fullmatch(child.name)) and (child / ".metadata").is_file()
    ]
    return sorted(steps, reverse=True)


def resolve_init_from(spec: str) -> Path:
    """The checkpoint folder ``--stage.init_from`` names, as an absolute path: a ``step-N``
    folder itself, else the newest complete ``step-N`` of a checkpoint folder or of a run
    folder's ``checkpoint/``."""
    from unimm.titan.checkpoint import checkpoint_problem

    path = Path(spec).expanduser().resolve()
    if (path / ".metadata").is_file():
        return path
    if (path / "model.safetensors.index.json").is_file():
        raise ConfigError(
            f"--stage.init_from {spec} is a Hugging Face folder: start from it with --checkpoint.initial_load_path "
            f"{path} --checkpoint.initial_load_in_hf --checkpoint.initial_load_model_only"
        )
    for folder in (path / "checkpoint", path):
        steps = _dcp_steps(folder)
        if steps:
            newest = folder / f"step-{steps[0]}"
            problem = checkpoint_problem(newest)
            if problem:
                raise ConfigError(
                    f"--stage.init_from {spec}: its newest checkpoint {newest} is damaged ({problem}); "
                    "name an intact step-N folder instead"
                )
            return newest
    raise ConfigError(
        f"--stage.init_from {spec}: no checkpoint there (expected a run folder with checkpoint/step-N, "
        "a checkpoint folder, or a step-N folder holding .metadata)"
    )


def check_architecture(path: Path, model_config, what: str) -> None:
    """Refuse a DCP checkpoint whose model tensors are not ``model_config``'s (names and shapes)."""
    from unimm.convert.architecture import checkpoint_differences

    shown = checkpoint_differences(path, model_config, limit=4)
    if shown:
        raise ConfigError(
            f"{what} {path} holds another architecture than this run's model: {shown}. A stage starts from a "
            "checkpoint of the same model (the same recipe and --model_size.* / model options)"
        )


def prepare_stage_start(config) -> None:
    """Before the trainer is built: turn ``--stage.init_from`` into torchtitan's
    ``initial_load_*`` options and check the architecture of the checkpoint a fresh run would
    load (``--checkpoint.initial_load_path``, DCP format)."""
    stage, checkpoint = config.stage, config.checkpoint
    own = Path(config.dump_folder) / checkpoint.folder
    has_own = bool(_dcp_steps(own)) or any(own.glob("step-*/model.safetensors.index.json"))
    resuming = checkpoint.enable and (checkpoint.load_step >= 0 or has_own)
    if stage.init_from:
        if not checkpoint.enable:
            raise ConfigError("--stage.init_from loads through the checkpointer: it needs --checkpoint.enable")
        if resuming:
            logger.info(f"Stage: {own} holds checkpoints, so the run resumes from them; --stage.init_from is not used")
            return
        source = resolve_init_from(stage.init_from)
        given = checkpoint.initial_load_path
        if given and Path(given).resolve() != source:
            raise ConfigError(
                f"--stage.init_from {stage.init_from} ({source}) and --checkpoint.initial_load_path {given} "
                "name different checkpoints: give one"
            )
        if checkpoint.initial_load_in_hf:
            raise ConfigError("--stage.init_from names a DCP checkpoint: drop --checkpoint.initial_load_in_hf")
        checkpoint.initial_load_path = str(source)
        checkpoint.initial_load_model_only = True
        logger.info(f"Stage: starting from the weights of {source}")
    path = checkpoint.initial_load_path
    if checkpoint.enable and path and not resuming and not checkpoint.initial_load_in_hf and "://" not in path:
        what = "--stage.init_from" if stage.init_from else "--checkpoint.initial_load_path"
        check_architecture(Path(path), config.model_spec.model, what)


__all__ = [
    "FrozenRows",
    "StageConfig",
    "StagePlan",
    "StagedOptimizersContainer",
    "check_architecture",
    "prepare_stage_start",
    "resolve_init_from",
]
