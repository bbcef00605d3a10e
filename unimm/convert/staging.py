"""Write a folder whole or not at all."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from unimm.errors import ConfigError

STAGING_PREFIX = ".unimm-convert-"
# .unimm-convert-TARGET@HOST+PID-RANDOM[-replaced]: TARGET is a digest of the final folder's
# name (a "step-0" in the name would make torchtitan take the folder for a checkpoint), HOST and
# PID the process that made it, so that a rerun can tell a dead one's leftovers from a live one.
_STAGING = re.compile(r"(?P<host>[^@+/]*)\+(?P<pid>\d+)-[a-z0-9_]+(?:-replaced)?")
# what unimm train writes into a run folder besides checkpoint/ (unimm/titan)
RUN_FILES = ("metrics.jsonl", "expert_load.jsonl", "nonfinite_steps.jsonl")
_LEGACY = re.compile(re.escape(STAGING_PREFIX) + r"[a-z0-9_]{8}(?:-replaced)?")  # unimm before the PID names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_permissions(folder: Path) -> None:
    # mkdtemp makes a private folder and safetensors writes private files; the result should
    # be readable like any other folder this user writes.
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _move_into_place(staging: Path, final: Path) -> None:
    if final.exists():
        replaced = staging.with_name(staging.name + "-replaced")
        final.rename(replaced)
        staging.rename(final)
        shutil.rmtree(replaced)
    else:
        staging.rename(final)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _target_prefix(final: Path) -> str:
    return f"{STAGING_PREFIX}{hashlib.sha256(final.name.encode()).hexdigest()[:12]}@"


def staging_prefix(final: Path, pid: int | None = None) -> str:
    """The start of the name of a staging folder for ``final`` made by process ``pid`` (default:
    this one) on this host; a random part follows."""
    return f"{_target_prefix(final)}{_host()}+{os.getpid() if pid is None else pid}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _warn(message: str) -> None:
    print(f"unimm: warning: {message}", file=sys.stderr)


def clean_stale_staging(final: Path) -> list[Path]:
    """Remove the staging folders of ``final`` whose process is dead (a killed conversion's
    leftovers); return them. A live process's folder, or one made on another host (its process
    cannot be checked from here), is kept."""
    if not final.parent.is_dir():
        return []
    prefix, host, removed = _target_prefix(final), _host(), []
    for path in sorted(final.parent.iterdir()):
        if _LEGACY.fullmatch(path.name):
            _warn(f"{path}: a staging folder of an older unimm convert; remove it by hand if no conversion is running")
            continue
        if not path.name.startswith(prefix) or not (match := _STAGING.fullmatch(path.name[len(prefix):])):
            continue
        if match["host"] != host:
            _warn(f"{path}: left by a conversion on host {match['host']}; remove it by hand if that one is over")
        elif not _pid_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
                _warn(f"removed {path}, left by a conversion (process {match['pid']}) that did not finish")
    return removed


def training_state(folder: Path) -> list[Path]:
    """What in ``folder`` is a training run's state: a run folder's checkpoints and metrics, or a
    checkpoint (``step-N``, DCP ``.metadata``). Conversions never replace or delete these."""
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_FILES if (folder / name).exists()]
    if (folder / "checkpoint").is_dir():
        found.append(folder / "checkpoint")
    if (folder / ".metadata").is_file() or re.fullmatch(r"step-\d+", folder.name):
        found.append(folder)
    return found


def seed_checkpoint_destination(run: Path, overwrite: bool, writer: str, marker: str, hint: str) -> Path:
    """``run/checkpoint/step-0`` if ``writer`` (a conversion that seeds a run) may write it; a
    ConfigError otherwise. A run's state is never replaced, nor is step-0 written beside it
    (unimm train would resume from the run's latest step, not from step-0); ``overwrite``
    replaces only a step-0 that holds ``marker``, the file ``writer`` leaves in what it writes.
    ``hint`` ends the refusal: what to do instead."""
    checkpoint = run / "checkpoint"
    step0 = checkpoint / "step-0"
    for path in (run, checkpoint):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is not a folder; {writer} writes {step0}")
    state = [run / name for name in RUN_FILES if (run / name).exists()]
    if checkpoint.is_dir():
        state += sorted(p for p in checkpoint.iterdir() if p != step0 and not p.name.startswith(STAGING_PREFIX))
    if step0.exists() and not (step0 / marker).is_file():
        state.append(step0)
    if state:
        shown = ", ".join(map(str, state[:3])) + (f" and {len(state) - 3} more" if len(state) > 3 else "")
        unmarked = (
            f" ({step0} holds no {marker}: it was not written by {writer}, or by an older unimm; "
            "remove it by hand if it is yours to replace)" if step0 in state else ""
        )
        raise ConfigError(
            f"{run} holds training state ({shown}){unmarked}; {writer} never replaces a run's checkpoints, "
            "nor writes step-0 beside them (unimm train would resume from the run's latest step), "
            f"with or without --overwrite. {hint}"
        )
    if step0.exists() and not overwrite:
        raise ConfigError(f"{step0} exists (an earlier {writer} wrote it); pass --overwrite to replace it")
    return step0


@contextmanager
def staged_folder(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``final`` to fill. When the block succeeds it becomes
    ``final`` (replacing an existing one only with ``overwrite``); when it fails it is removed,
    with any parent folders made for it, so a failure leaves nothing behind. Staging folders of
    ``final`` left by dead processes (a killed conversion) are removed first."""
    if final.exists() and not (overwrite and final.is_dir()):
        raise ConfigError(f"{final} exists; pass --overwrite to replace it")
    made = [parent for parent in final.parents if not parent.exists()]  # deepest first
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(final)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final), dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in made:
            with suppress(OSError):
                parent.rmdir()
        raise
    _give_default_permissions(staging)
    _move_into_place(staging, final)
