"""Command-line and config mistakes found before anything is launched.

``unimm train`` calls :func:`check_arguments` on its own options (before torchtitan is even
imported) and :func:`check_config` on the parsed recipe, before torchrun; the worker entry
point calls :func:`check_config` too when torchrun was started by hand. Without them these
values reached torchtitan or the data loader and surfaced as assertion tracebacks from every
rank, or were accepted and trained nothing (``--steps 0``) or the wrong thing (a negative
LR). Each message names the setting as it is spelled on the command line, the value given
and what was expected; all mistakes found are reported together, on one line.

Errors and warnings. A value that cannot train (a batch of 0 rows, a parallel layout that
does not multiply to the process count, more processes than GPUs, which fails binding a
device) is an error. A value someone may mean is a warning: more processes than CPU cores
(multi-process runs on a small machine are how the FSDP path is tried out; the processes
share the cores and it only runs slower) and an LR of 0 (used on purpose to check that a
run resumes or converts without changing the weights).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from unimm.errors import ConfigError
from unimm.titan import compat

LR_OPTION = "--optimizer.param-groups.{group}.optimizer-kwargs.lr"
"""torchtitan 0.3.0's spelling of one param group's learning rate (tyro; measured)."""

_MISSING = object()


def _name(arg: str) -> str:
    """``--optimizer.param-groups.0.optimizer-kwargs.lr=3`` -> ``optimizer.param_groups.0.optimizer_kwargs.lr``."""
    return arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""


def gives_lr(extra: list[str]) -> bool:
    """Whether the torchtitan overrides set a param group's learning rate themselves."""
    return any(
        (parts := _name(arg).split("."))[:2] == ["optimizer", "param_groups"] and parts[-1] == "lr" for arg in extra
    )


def lr_overrides(lr: float, groups: int = 1) -> list[str]:
    """``--lr`` as torchtitan overrides: the same peak LR for each of ``groups`` param groups."""
    return [token for group in range(groups) for token in (LR_OPTION.format(group=group), repr(float(lr)))]


def check_arguments(
    out: str, steps: int | None, nproc: int, lr: float | None = None, extra: list[str] | tuple = ()
) -> list[str]:
    """``unimm train``'s own options; returns warnings, raises ConfigError naming each mistake."""
    errors, warnings = [], []
    if steps is not None and steps < 1:
        errors.append(f"--steps {steps}: expected a positive number of training steps")
    if nproc < 1:
        errors.append(f"--nproc {nproc}: expected at least 1 process")
    path = Path(out)
    if path.exists() and not path.is_dir():
        errors.append(f"--out {out} is a file: expected a run folder (an existing or a new directory)")
    else:
        blocking = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            errors.append(f"--out {out}: {blocking} is a file, so the run folder cannot be created")
    if lr is not None:
        if not math.isfinite(lr) or lr < 0:
            errors.append(f"--lr {lr}: expected a non-negative learning rate (e.g. --lr 3e-4)")
        if gives_lr(list(extra)):
            errors.append(
                "--lr and --optimizer.param-groups.N.optimizer-kwargs.lr both set the learning rate: give one"
            )
    for arg in extra:
        name = _name(arg)
        if name == "optimizer.lr":
            errors.append(
                f"{arg.split('=')[0]} is not an option of torchtitan 0.3.0: use --lr 3e-4 "
                "(or --optimizer.param-groups.0.optimizer-kwargs.lr 3e-4)"
            )
        elif name == "dump_folder":
            errors.append(f"{arg.split('=')[0]}: unimm train takes the run folder from --out")
    if errors:
        raise ConfigError("; ".join(errors))
    return warnings


def _get(config, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def data_parallel_degree(parallelism, world_size: int) -> int:
    """The data-parallel degree torchtitan derives (``ParallelDims``): replicate x shard, the
    shard degree -1 taking the ranks left after replicate, context, tensor and pipeline."""
    others = 1
    for name in ("data_parallel_replicate_degree", "context_parallel_degree", "tensor_parallel_degree",
                 "pipeline_parallel_degree"):
        others *= max(1, getattr(parallelism, name, 1))
    shard = parallelism.data_parallel_shard_degree
    if shard < 0:
        shard = max(1, world_size // others)
    return max(1, parallelism.data_parallel_replicate_degree) * shard


def global_batch_size(config, world_size: int) -> int:
    """training.global_batch_size as torchtitan resolves it (-1: local batch x data-parallel degree)."""
    training = config.training
    dp = data_parallel_degree(config.parallelism, world_size)
    return training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * dp


def num_streams(config, world_size: int) -> int:
    """dataloader.num_streams as the loader resolves it (0: one per data-parallel rank)."""
    return config.dataloader.num_streams or data_parallel_degree(config.parallelism, world_size)


def devices() -> tuple[str, int]:
    """("GPU"/accelerator type, visible count) when training will use an accelerator, else
    ("CPU core", cores this process may run on)."""
    import torch

    if torch.cuda.is_available():
        return "GPU", torch.cuda.device_count()
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return f"{accelerator.current_accelerator().type} device", accelerator.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "CPU core", cores


def check_devices(local_processes: int, found: tuple[str, int] | None = None) -> list[str]:
    """More processes on this machine than GPUs is an error (each rank binds the GPU of its
    local rank); more than CPU cores a warning (the processes share the cores)."""
    kind, count = found or devices()
    if local_processes <= count:
        return []
    if kind == "CPU core":
        return [
            f"--nproc {local_processes} is more than the {count} CPU cores this process may use: the processes "
            "will share them (it runs, only slower)"
        ]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None and kind == "GPU" else ""
    raise ConfigError(
        f"--nproc {local_processes} is more than the {count} visible {kind}s{where}: each process needs its own; "
        f"pass --nproc {count} or fewer"
    )


def check_config(config, world_size: int) -> list[str]:
    """Every setting of a parsed recipe that can be checked without data or weights, for a run
    of ``world_size`` processes; returns warnings, raises one ConfigError naming every mistake."""
    errors: list[str] = []
    warnings: list[str] = []

    def need(dotted: str, ok, expected: str) -> None:
        value = _get(config, dotted)
        if value is _MISSING:
            return
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            errors.append(f"--{dotted}={value}: expected {expected}")

    def positive(v) -> bool:
        return v > 0

    def fraction(v) -> bool:
        return 0 <= v <= 1

    need("training.steps", positive, "a positive number of training steps")
    need("training.local_batch_size", positive, "a positive number of rows per data-parallel rank")
    need("training.seq_len", positive, "a positive sequence length")
    need("training.max_norm", positive, "a positive gradient-clipping norm (a large value clips nothing)")
    need("lr_scheduler.warmup_steps", lambda v: v >= 0, "0 or more warmup steps")
    need("lr_scheduler.min_lr_factor", fraction, "a fraction of the peak LR in [0, 1]")
    need("lr_scheduler.decay_ratio", lambda v: v is None or 0 <= v <= 1, "a fraction of the steps in [0, 1]")
    need("metrics.log_freq", positive, "a positive number of steps between logged steps")
    if _get(config, "checkpoint.enable") is True:
        need("checkpoint.interval", positive, "a positive number of steps between checkpoints")
    need("checkpoint.keep_latest_k", lambda v: v >= 0, "0 (keep all) or more checkpoints to keep")
    need("dataloader.max_bad_fraction", lambda v: 0 <= v < 1,
         "a fraction in [0, 1): the share of a source's samples that may be bad before the run stops")
    need("dataloader.max_latent_deviation", positive, "a positive number of standard deviations")
    need("dataloader.p_understanding", fraction, "a probability in [0, 1]")
    need("dataloader.cond_dropout", fraction, "a probability in [0, 1]")
    need("dataloader.num_workers", lambda v: v >= 0, "0 or more loader worker processes")
    need("dataloader.num_streams", lambda v: v >= 0, "0 (one per data-parallel rank) or more data streams")
    for capacity in ("lm_capacity", "flow_capacity"):
        need(f"dataloader.{capacity}", lambda v: 0 < v <= 1,
             "a fraction in (0, 1] of a batch's positions (a batch that needs more uses all of them)")
    need("dataloader.latent_wire_dtype", lambda v: v in ("auto", "float32", "bfloat16", "float16"),
         "auto, float32, bfloat16 or float16")
    need("dataloader.overlap", lambda v: v in ("auto", "on", "off"), "auto (on with CUDA), on or off")
    need("loss.lm_chunk_rows", positive, "a positive number of rows per cross-entropy chunk")
    need("loss.lambda_lm", lambda v: v >= 0, "a non-negative loss weight")
    need("loss.lambda_flow", lambda v: v >= 0, "a non-negative loss weight")
    if _get(config, "loss.loss_centering") is True:
        need("loss.center_alpha", fraction, "a value in [0, 1]")
        need("loss.center_momentum", lambda v: 0 <= v < 1, "a value in [0, 1)")

    weights = _get(config, "dataloader.source_weights")
    if weights is not _MISSING and weights:
        bad = {name: w for name, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
        for name, w in bad.items():
            errors.append(
                f"--dataloader.source_weights: source {name!r} has weight {w}: expected a non-negative weight "
                "(0 drops the source)"
            )
        if not bad and sum(weights.values()) <= 0:
            errors.append(f"--dataloader.source_weights {dict(weights)}: every weight is 0, so no source is read")

    groups = _get(config, "optimizer.param_groups")
    for index, group in enumerate(groups if groups is not _MISSING else []):
        kwargs = getattr(group, "optimizer_kwargs", None) or {}
        for key in ("lr", "weight_decay"):
            value = kwargs.get(key)
            if value is None:
                continue
            option = f"--optimizer.param-groups.{index}.optimizer-kwargs.{key}"
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                what = "learning rate (--lr)" if key == "lr" else "weight decay"
                errors.append(f"{option}={value}: expected a non-negative {what}")
            elif key == "lr" and value == 0:
                warnings.append(f"learning rate 0 (--lr 0, param group {index}): the weights will not change")

    if _get(config, "training.float8.enable") is True:
        from importlib.util import find_spec

        if find_spec("torchao") is None:
            errors.append(
                "--training.float8.enable needs torchao, which is not installed (pip install torchao, the build "
                "matching your torch); or leave float8 off"
            )
    errors += _parallel_errors(config, world_size)
    if not errors:  # the batch and stream layout presumes a valid parallel layout
        errors += _batch_errors(config, world_size)
    if errors:
        raise ConfigError("; ".join(dict.fromkeys(errors)))
    return list(dict.fromkeys(warnings))


def _parallel_errors(config, world_size: int) -> list[str]:
    parallelism = _get(config, "parallelism")
    if parallelism is _MISSING:
        return []
    degrees = {
        "data_parallel_replicate_degree": parallelism.data_parallel_replicate_degree,
        "context_parallel_degree": getattr(parallelism, "context_parallel_degree", 1),
        "tensor_parallel_degree": getattr(parallelism, "tensor_parallel_degree", 1),
        "pipeline_parallel_degree": getattr(parallelism, "pipeline_parallel_degree", 1),
        "expert_parallel_degree": getattr(parallelism, "expert_parallel_degree", 1),
    }
    errors = [f"--parallelism.{name}={value}: expected 1 (off) or more" for name, value in degrees.items() if value < 1]
    unsupported = compat.expert_parallel_error(degrees["expert_parallel_degree"])
    if unsupported:
        errors.append(unsupported)
    shard = parallelism.data_parallel_shard_degree
    if shard == 0 or shard < -1:
        errors.append(f"--parallelism.data_parallel_shard_degree={shard}: expected -1 (the processes left) or 1 or more")
    if errors:
        return errors
    others = math.prod(degrees[name] for name in degrees if name != "expert_parallel_degree")
    layout = (
        f"data_parallel_replicate_degree {degrees['data_parallel_replicate_degree']} x context "
        f"{degrees['context_parallel_degree']} x tensor {degrees['tensor_parallel_degree']} x pipeline "
        f"{degrees['pipeline_parallel_degree']}"
    )
    if shard == -1:
        if world_size % others:
            return [f"--parallelism: {layout} = {others} does not divide the {world_size} processes (--nproc)"]
    elif others * shard != world_size:
        return [
            f"--parallelism: {layout} x data_parallel_shard_degree {shard} = {others * shard} processes, "
            f"but the run has {world_size} (--nproc)"
        ]
    return []


def _batch_errors(config, world_size: int) -> list[str]:
    training = config.training
    if training.local_batch_size < 1:
        return []  # reported already
    dp = data_parallel_degree(config.parallelism, world_size)
    errors = []
    per_step = training.local_batch_size * dp
    if training.global_batch_size == 0 or (training.global_batch_size > 0 and training.global_batch_size % per_step):
        errors.append(
            f"--training.global_batch_size={training.global_batch_size}: expected -1 (local batch x data-parallel "
            f"degree) or a multiple of --training.local_batch_size {training.local_batch_size} x data-parallel "
            f"degree {dp} = {per_step}"
        )
    loader = _get(config, "dataloader")
    if loader is _MISSING or not hasattr(loader, "num_streams") or loader.num_streams < 0:
        return errors
    streams = loader.num_streams or dp
    if streams % dp:
        errors.append(
            f"--dataloader.num_streams={streams}: expected a multiple of the data-parallel degree {dp} "
            "(each rank reads the same number of streams)"
        )
        return errors
    per_rank = streams // dp
    workers = max(getattr(loader, "num_workers", 0), 1)
    if per_rank % workers:
        errors.append(
            f"--dataloader.num_workers={loader.num_workers}: expected a divisor of each rank's {per_rank} streams "
            f"(--dataloader.num_streams {streams} / data-parallel degree {dp})"
        )
        return errors
    per_batch = per_rank // workers
    if training.local_batch_size % per_batch:
        errors.append(
            f"--training.local_batch_size={training.local_batch_size}: expected a multiple of the {per_batch} "
            f"streams that build each batch (--dataloader.num_streams {streams} / data-parallel degree {dp}"
            + (f" / --dataloader.num_workers {workers}" if workers > 1 else "") + ")"
        )
    return errors
