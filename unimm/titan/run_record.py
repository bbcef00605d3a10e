"""``DIR/run.json``: what a run folder was started with, checked when the run resumes.

``unimm train`` writes it at every launch (recipe, model shape, batch and data layout, LR,
steps, and a short launch history). When the folder already holds a checkpoint, the new
launch is compared with it first: a checkpoint only continues the run it came from, and
before this a resume with another recipe or model failed deep inside checkpoint loading,
while one with another batch size or sequence length was accepted silently and quietly
changed the run.

- Refused always: another recipe, another model shape (the checkpoint cannot load), another
  number of data streams (the saved data position cannot be restored).
- Refused unless ``--allow-config-change``: another global batch size, sequence length,
  shards folder or tokenizer (they load, but the run is no longer the one that was started).
- Recorded only: steps (extending a run is normal), LR, process count, local batch size at
  an equal global batch (another --nproc with a fixed --dataloader.num_streams is supported).

A folder with checkpoints but no run.json (written before it existed, or by
``unimm convert from-hf``) is adopted: the first launch writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unimm.errors import ConfigError
from unimm.titan.config_checks import data_parallel_degree, global_batch_size, num_streams

RECORD_NAME = "run.json"
HISTORY = 20
"""Launches kept in run.json's history."""

CHANGEABLE = (
    "training.global_batch_size", "training.seq_len", "model.max_seq_len", "dataloader.shards", "tokenizer.path",
)
"""Settings a resume may change with --allow-config-change (``model.max_seq_len`` follows
seq_len in the data-fitted recipes and only sizes the RoPE table, which is not saved)."""

FIXED_MODEL_FIELDS_SKIPPED = ("param_init", "sharding_config", "attn_backend", "backend")
"""Model config fields (at any depth) that do not shape the checkpoint: how to initialise or
compute, not what."""


def record_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / RECORD_NAME


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name not in FIXED_MODEL_FIELDS_SKIPPED
        }
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _abs(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else ""


def model_settings(config) -> dict[str, Any]:
    """The model's shape: every field of its config but how it is computed or initialised."""
    spec = config.model_spec
    settings: dict[str, Any] = {"model.flavor": getattr(spec, "flavor", None)}
    model = spec.model
    for field in dataclasses.fields(model):
        if field.name not in FIXED_MODEL_FIELDS_SKIPPED:
            settings[f"model.{field.name}"] = _jsonable(getattr(model, field.name))
    return settings


def run_settings(config, recipe: str, nproc: int) -> dict[str, Any]:
    """The settings a resume is compared on, plus the recorded-only ones (before the data
    fixes the model, so without the model's shape: :func:`model_settings`)."""
    groups = getattr(config.optimizer, "param_groups", []) or []
    return {
        "recipe": recipe,
        "training.global_batch_size": global_batch_size(config, nproc),
        "training.seq_len": config.training.seq_len,
        "dataloader.num_streams": num_streams(config, nproc),
        "dataloader.shards": _abs(config.dataloader.shards),
        "tokenizer.path": _abs(getattr(config.tokenizer, "path", "") or ""),
        # recorded only
        "training.local_batch_size": config.training.local_batch_size,
        "training.steps": config.training.steps,
        "nproc": nproc,
        "data_parallel_degree": data_parallel_degree(config.parallelism, nproc),
        "lr": [(getattr(g, "optimizer_kwargs", None) or {}).get("lr") for g in groups],
    }


def read_record(folder: str | os.PathLike) -> dict | None:
    path = record_path(folder)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}): move it away to start the record afresh") from None
    return record if isinstance(record, dict) else None


def _compare(saved: dict, current: dict, keys, folder) -> list[str]:
    """A message for each of ``keys`` that both record, with different values."""
    return [
        f"{key} is {current[key]!r} but {folder} was started with {saved[key]!r}"
        for key in keys
        if key in saved and key in current and saved[key] != current[key]
    ]


def check_resume(folder, record: dict | None, settings: dict, *, allow_change: bool = False) -> list[str]:
    """Compare a resumed launch with run.json (all but the model: :func:`check_model`);
    returns warnings (allowed changes), raises ConfigError for the rest. Call it when the
    folder holds a checkpoint."""
    if not record:
        return []
    saved = record.get("settings", {})
    where = record_path(folder)
    if saved.get("recipe") is not None and saved.get("recipe") != settings["recipe"]:
        raise ConfigError(
            f"--recipe {settings['recipe']}: {folder} holds a checkpoint of a {saved['recipe']!r} run ({where}); "
            f"resume it with --recipe {saved['recipe']}, or pass a new --out to start a {settings['recipe']!r} run"
        )
    streams = _compare(saved, settings, ["dataloader.num_streams"], folder)
    if streams:
        raise ConfigError(
            f"{streams[0]} ({where}): the saved data position is per stream; pass "
            f"--dataloader.num_streams {saved['dataloader.num_streams']}, or a new --out"
        )
    changed = _compare(saved, settings, CHANGEABLE, folder)
    if changed and not allow_change:
        batch = ""
        if any(message.startswith("training.global_batch_size") for message in changed):
            batch = (
                f" (global batch = --training.local_batch_size {settings['training.local_batch_size']} x data-parallel "
                f"degree {settings['data_parallel_degree']}; it was {saved.get('training.local_batch_size')} x "
                f"{saved.get('data_parallel_degree')})"
            )
        raise ConfigError(
            f"resuming with other settings: {'; '.join(changed)}{batch} ({where}). To continue this run with "
            "them anyway, pass --allow-config-change; to keep the run as it was, drop the new values; to start "
            "another run, pass a new --out"
        )
    return [f"{message}: continuing with the new value (--allow-config-change)" for message in changed]


def check_model(folder, record: dict | None, settings: dict) -> None:
    """ConfigError when the model's shape (:func:`model_settings`, known once the recipe is
    fitted to its data) differs from run.json's. Call it when the folder holds a checkpoint."""
    saved = (record or {}).get("settings", {})
    keys = sorted(k for k in settings if k.startswith("model.") and k not in CHANGEABLE)
    model = _compare(saved, settings, keys, folder)
    if model:
        raise ConfigError(
            f"the model differs from the checkpoint's: {'; '.join(model)} ({record_path(folder)}); a checkpoint "
            "cannot load into another model shape: drop the new model options, or pass a new --out"
        )


def write_record(folder, record: dict | None, settings: dict, argv: list[str] | None = None) -> Path:
    """run.json with ``settings`` and one more launch in its history (atomic replace)."""
    now = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    launches = list((record or {}).get("launches", []))[-(HISTORY - 1):]
    launches.append({"time": now, "host": socket.gethostname(), "pid": os.getpid(),
                     "argv": list(sys.argv if argv is None else argv)})
    new = {
        "created": (record or {}).get("created", now),
        "settings": settings,
        "launches": launches,
    }
    path = record_path(folder)
    tmp = path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(new, indent=1) + "\n")
    os.replace(tmp, path)
    return path
