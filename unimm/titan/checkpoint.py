"""torchtitan's DCP checkpoint manager with two guarantees added: no checkpoint is written
with a non-finite value in it, and a damaged checkpoint never blocks a resume.

Saving. Every save (interval, last step, model-only, HF export, seed checkpoint) goes
through ``CheckpointManager.dcp_save`` with the exact state about to be written; this
subclass checks every floating-point tensor (model, optimizer state) and every float of the
small states (train state, LR schedule, ...) first. All ranks agree on the verdict (one
all-reduce and one host sync per save); a non-finite value raises NonFiniteCheckpointError,
naming the tensors, before anything is written, so the newest checkpoint on disk stays the
last good one.

Loading. torchtitan resumes from the highest ``step-N`` folder holding a ``.metadata``
file. DCP writes ``.metadata`` last, so a save killed midway leaves a folder torchtitan
already ignores; but a folder whose data was lost afterwards (a truncated or missing
``.distcp`` file, metadata intact) used to fail every resume with a bare EOFError. Here the
newest folders are checked first (``checkpoint_problem``: metadata readable, every stored
item inside its file; sizes only, no data read), and a load that still fails with a
data-corruption error (EOFError, unpickling errors) counts as damage too. A damaged folder
is moved to ``checkpoint/damaged/step-N`` (renamed, never deleted) with a warning naming it,
and the run resumes from the newest intact checkpoint. If no intact checkpoint is left the
run stops instead of silently starting from scratch, and nothing is moved.

``damaged/`` matches neither torchtitan's ``step-(\\d+)`` search (checkpoint choice and the
``keep_latest_k`` purge) nor ``step-*`` globs of other tools, so a quarantined folder is
never loaded or purged by accident.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import DATALOADER, MODEL, OPTIMIZER, TRAIN_STATE, CheckpointManager
from torchtitan.tools import filesystem
from torchtitan.tools.logging import logger

from unimm.errors import RunStopped

QUARANTINE = "damaged"
_STEP = re.compile(r"step-(\d+)")  # torchtitan's own pattern (CheckpointManager._find_load_step)
_CORRUPTION_ERRORS = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile)

# train_state keys added after checkpoints already existed: a checkpoint without them loads
# with the trainer's default instead of failing DCP's strict key check.
OPTIONAL_TRAIN_STATE_KEYS = ("skipped_nonfinite_steps",)


class NonFiniteCheckpointError(RunStopped):
    """The state about to be checkpointed holds NaN or Inf; nothing was written."""


class DamagedCheckpointError(RunStopped):
    """The checkpoint to resume from is damaged and no intact one is left to fall back to."""


# -- verification ----------------------------------------------------------------------


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with the DCP checkpoint ``folder`` (None if nothing found).

    Checks what can be checked without reading tensor data: ``.metadata`` unpickles, and every
    stored item (file, offset, length it lists) lies inside an existing file. That catches
    truncated, missing and emptied data files. A Hugging Face folder (last_save_in_hf) is not
    checked."""
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        if (folder / "model.safetensors.index.json").is_file():
            return None
        return "no .metadata file (the save did not finish)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # noqa: BLE001 (any failure to read it is the finding)
        return f".metadata is unreadable ({type(err).__name__}: {err})"
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        return None  # a writer that records no layout: nothing to check against
    needed: dict[str, int] = {}
    for info in storage.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size < end:
            problems.append(f"{name} holds {path.stat().st_size} bytes, the metadata lists data up to byte {end}")
    return "; ".join(problems) or None


def complete_steps(folder: str | Path) -> list[int]:
    """Steps of the ``step-N`` folders torchtitan would consider (with ``.metadata`` or an HF
    index), newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        match = _STEP.search(child.name)
        if match and ((child / ".metadata").is_file() or (child / "model.safetensors.index.json").is_file()):
            steps.append(int(match.group(1)))
    return sorted(set(steps), reverse=True)


def _looks_corrupted(err: BaseException) -> bool:
    """An exception of a DCP load that means bad bytes on disk, not a config mismatch."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, _CORRUPTION_ERRORS):
            return True
        for wrapped in (getattr(exc, "failures", None) or {}).values():  # DCP's CheckpointException
            stack.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        stack += [exc.__cause__, exc.__context__]
    return False


def _floats(value: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(name, tensor or float) for every floating-point value inside a state."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield name, value
    elif isinstance(value, float):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floats(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _floats(item, f"{name}.{i}")


def _optimizer_floats(optimizers: Any) -> Iterator[tuple[str, Any]]:
    """Optimizer state tensors read in place (no state_dict flattening), named by parameter."""
    for opt in getattr(optimizers, "optimizers", [optimizers]):
        names = {}
        for group in getattr(opt, "param_groups", []):
            for param, pname in zip(group["params"], group.get("param_names") or []):
                names[id(param)] = pname
        for param, state in getattr(opt, "state", {}).items():
            pname = names.get(id(param), f"param{id(param)}")
            for key, value in state.items():
                yield from _floats(value, f"{OPTIMIZER}.state.{pname}.{key}")


def _state_floats(state_dict: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in state_dict.items():
        if key == DATALOADER:
            continue  # data positions, pickled
        if key == OPTIMIZER and hasattr(value, "param_groups"):
            yield from _optimizer_floats(value)
        elif isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
            yield from _floats(value.state_dict(), key)
        else:
            yield from _floats(value, key)


def nonfinite_entries(state_dict: dict[str, Any], *, limit: int = 20) -> tuple[bool, list[str]]:
    """(all finite on this rank, names of up to ``limit`` non-finite entries).

    Tensors are checked on their device (local shards of DTensors) and combined into one flag:
    a single host transfer, plus one per tensor only when something is found."""
    flags, names, bad_floats = [], [], []
    for name, value in _state_floats(state_dict):
        if isinstance(value, torch.Tensor):
            local = value._local_tensor if isinstance(value, DTensor) else value
            if local.numel():
                flags.append(torch.isfinite(local).all())
                names.append(name)
        elif not math.isfinite(value):
            bad_floats.append(name)
    ok = not bad_floats and (not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all()))
    if ok:
        return True, []
    bad = bad_floats + [n for n, f in zip(names, flags) if not bool(f)]
    return False, bad[:limit]


# -- the manager -----------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast(obj: Any) -> Any:
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _WithoutKeys(Stateful):
    """A Stateful seen without some keys, for loading a checkpoint written before they existed."""

    def __init__(self, inner: Stateful, missing: list[str]) -> None:
        self.inner, self.missing = inner, missing

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.inner.state_dict().items() if k not in self.missing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


class UnimmCheckpointManager(CheckpointManager):
    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    @classmethod
    def adopt(cls, config: CheckpointManager.Config) -> CheckpointManager.Config:
        """This manager's Config with the values of torchtitan's (recipes build that one);
        any other manager's Config is returned unchanged."""
        if type(config) is not CheckpointManager.Config:
            return config
        return cls.Config(**{f.name: getattr(config, f.name) for f in fields(config) if f.init})

    def will_save(self, step: int, last_step: bool) -> bool:
        """Whether ``save(step, last_step)`` will write a checkpoint."""
        return self._should_save(step, last_step)

    # -- saving ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        for model in self.states[MODEL].model:
            for param in model.parameters():
                local = param._local_tensor if isinstance(param, DTensor) else param
                return local.device
        return torch.device("cpu")

    @torch.no_grad()
    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, *args, **kwargs):
        ok, bad = nonfinite_entries(state_dict)
        if _world() > 1:
            flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=self._device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                gathered: list[Any] = [None] * _world()
                dist.all_gather_object(gathered, bad)
                bad = [f"rank {r}: {name}" for r, names in enumerate(gathered) for name in names or []]
                ok = False
        if not ok:
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {checkpoint_id}: the state holds non-finite values "
                f"({', '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}); the newest checkpoint on disk "
                "is the last one with finite values"
            )
        return super().dcp_save(state_dict, checkpoint_id, *args, **kwargs)

    # -- loading --------------------------------------------------------------------------

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        train_state = state_dict.get(TRAIN_STATE)
        if not from_hf and isinstance(train_state, Stateful) and not filesystem.is_remote(checkpoint_id):
            missing = self._missing_optional_keys(checkpoint_id)
            if missing:
                state_dict = {**state_dict, TRAIN_STATE: _WithoutKeys(train_state, missing)}
        super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

    @staticmethod
    def _missing_optional_keys(checkpoint_id: str) -> list[str]:
        try:
            from torch.distributed.checkpoint import FileSystemReader

            stored = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
        except Exception:  # noqa: BLE001 (the load itself reports an unreadable checkpoint)
            return []
        return [k for k in OPTIONAL_TRAIN_STATE_KEYS if f"{TRAIN_STATE}.{k}" not in stored]

    def _quarantine(self, step: int) -> Path:
        """Rename ``step-N`` to ``damaged/step-N`` (``.1``, ``.2``, ... if taken); rank 0 only."""
        source = Path(self._create_checkpoint_id(step))
        target_dir = Path(self.folder) / QUARANTINE
        target, n = target_dir / source.name, 1
        while target.exists():
            target, n = target_dir / f"{source.name}.{n}", n + 1
        target_dir.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        return target

    def _pick(self, failed: set[int]) -> tuple[int, list[tuple[int, str, str]]]:
        """(newest intact step or -1, [(damaged step, reason, where it was moved)]).

        Rank 0 checks the folders newest first and moves the damaged ones newer than the
        intact one aside, then tells the other ranks (the broadcast orders the rename before
        any rank loads). With no intact checkpoint left nothing is moved."""
        decision: Any = None
        if _rank() == 0:
            try:
                damaged, chosen = [], -1
                for step in complete_steps(self.folder):
                    reason = "loading it failed" if step in failed else checkpoint_problem(self._create_checkpoint_id(step))
                    if reason is None:
                        chosen = step
                        break
                    damaged.append((step, reason))
                moved = [(step, why, str(self._quarantine(step)) if chosen != -1 else "") for step, why in damaged]
                decision = (chosen, moved)
            except Exception as err:  # noqa: BLE001 (sent to every rank, so none waits forever)
                decision = f"checking the checkpoints in {self.folder} failed: {type(err).__name__}: {err}"
        decision = _broadcast(decision)
        if isinstance(decision, str):
            raise DamagedCheckpointError(decision)
        return decision

    def _load(self, step: int = -1) -> bool:
        if filesystem.is_remote(self.folder) or not Path(self.folder).is_dir():
            return super()._load(step)
        if step != -1:  # an explicit --checkpoint.load_step: check it, never substitute another
            folder = Path(self._create_checkpoint_id(step))
            problem = _broadcast(checkpoint_problem(folder) if _rank() == 0 and folder.is_dir() else None)
            if problem:
                raise DamagedCheckpointError(f"checkpoint {self._create_checkpoint_id(step)} is damaged: {problem}")
            return super()._load(step)
        failed: set[int] = set()
        while True:
            chosen, damaged = self._pick(failed)
            if damaged and chosen == -1:
                listing = "; ".join(f"{self._create_checkpoint_id(s)}: {why}" for s, why, _ in damaged)
                raise DamagedCheckpointError(
                    f"no intact checkpoint to resume from in {self.folder}: {listing}. Nothing was moved; to "
                    f"start this run from scratch, move those folders away (e.g. into {Path(self.folder) / QUARANTINE})"
                )
            for step, why, target in damaged:
                logger.warning(
                    f"checkpoint {self._create_checkpoint_id(step)} is damaged ({why}): moved it to {target}; "
                    f"resuming from the previous complete checkpoint, {self._create_checkpoint_id(chosen)}"
                )
            if chosen == -1:
                return super()._load(-1)  # no step folder at all: initial_load_path or a fresh start
            try:
                return super()._load(chosen)
            except BaseException as err:  # DCP's CheckpointException is a BaseException
                if not _looks_corrupted(err):
                    raise
                logger.warning(f"loading {self._create_checkpoint_id(chosen)} failed on corrupted data: {err}")
                failed.add(chosen)
