"""Write a folder whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from unimm.errors import ConfigError


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


@contextmanager
def staged_folder(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``final`` to fill. When the block succeeds it becomes
    ``final`` (replacing an existing one only with ``overwrite``); when it fails it is removed,
    with any parent folders made for it, so a failure leaves nothing behind."""
    if final.exists() and not (overwrite and final.is_dir()):
        raise ConfigError(f"{final} exists; pass --overwrite to replace it")
    made = [parent for parent in final.parents if not parent.exists()]  # deepest first
    final.parent.mkdir(parents=True, exist_ok=True)
    # No "step-N" in the name: torchtitan takes any folder named so for a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=".unimm-convert-", dir=final.parent))
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
