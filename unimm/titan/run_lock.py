"""One writer per run folder: an exclusive ``flock`` on ``DIR/.unimm.lock``.

``unimm train`` takes the lock before it launches and holds it until torchrun has exited;
rank 0 of a run started by hand (``torchrun ... -m unimm.titan.train``) takes it for its own
life. A second run on the same folder is refused with the holder's pid, host, command and
start time, which the holder writes into the file. The kernel releases a ``flock`` when its
holder dies, however it dies (SIGKILL, OOM killer, power loss of a node on a local disk), so
a lock left by a dead process never blocks: the file stays, the lock does not. The file is
never deleted (deleting a lock file races with a process about to lock it).

On a file system without ``flock`` support (some Lustre mounts without ``-o flock``) the
lock cannot be taken; the run goes ahead with a warning instead of failing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from unimm.errors import ConfigError

LOCK_NAME = ".unimm.lock"
LAUNCHER_ENV = "UNIMM_RUN_LOCK"
"""Set by ``unimm train`` for its workers: ``PID:PATH``, the lock it holds on their behalf."""

logger = logging.getLogger(__name__)


class RunLockedError(ConfigError):
    """The run folder is in use by another live process."""


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder).absolute() / LOCK_NAME


def holder_info(path: Path) -> dict:
    """What the holder wrote into the lock file ({} when unreadable or not yet written)."""
    for _ in range(20):  # the holder truncates, then writes: retry a moment on an empty file
        try:
            text = path.read_text()
        except OSError:
            return {}
        if text.strip():
            try:
                return json.loads(text)
            except ValueError:
                return {}
        time.sleep(0.05)
    return {}


def describe_holder(info: dict) -> str:
    if not info:
        return "another process (it wrote no details)"
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("role"):
        parts.append(f"({info['role']})")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return " ".join(parts)


class RunLock:
    """The exclusive lock of a run folder (``with RunLock(dir, role):`` or acquire/release)."""

    def __init__(self, folder: str | os.PathLike, role: str = "unimm train") -> None:
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.role = role
        self._fd: int | None = None
        self.unsupported = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock without waiting (creating the folder); RunLockedError naming the
        holder when a live process has it."""
        if self.held or self.unsupported:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = holder_info(self.path)
                where = f" (kill {holder['pid']} on {holder.get('host', '?')})" if holder.get("pid") else ""
                raise RunLockedError(
                    f"{self.folder} is in use by {describe_holder(holder)}: a second run would write the same "
                    f"checkpoints and metrics. Wait for that run to end or stop it{where}, or pass another --out "
                    f"(lock file {self.path})"
                ) from None
            # ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL: this file system has no flock
            self.unsupported = True
            logger.warning("could not lock %s (%s): running without the one-writer guard", self.path, err.strerror)
            print(f"unimm: warning: could not lock {self.path} ({err.strerror}): another run on this folder "
                  "would not be refused", file=sys.stderr)
            return self
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "role": self.role,
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no stale details once released
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_for_us(folder: str | os.PathLike) -> bool:
    """True when ``unimm train`` told this process (through LAUNCHER_ENV) that it holds the
    lock of ``folder`` on its behalf, and the lock file names that launcher."""
    value = os.environ.get(LAUNCHER_ENV, "")
    pid, _, path = value.partition(":")
    if not pid.isdigit() or Path(path) != lock_path(folder):
        return False
    return str(holder_info(Path(path)).get("pid")) == pid


def launcher_env(lock: RunLock) -> dict[str, str]:
    """The environment entry that tells the workers the launcher holds ``lock``."""
    return {LAUNCHER_ENV: f"{os.getpid()}:{lock.path}"} if lock.held else {}
