"""Tie a process's life to its parent's: when the parent dies, the process dies too.

A ``unimm train`` run is three generations of processes: ``unimm train`` (the launcher)
starts torchrun's agent, and the agent starts one worker per rank in a session of its own
(torch's ``SubprocessHandler`` uses ``start_new_session``). A SIGKILL to the launcher's
process group therefore reaches the launcher and the agent but never the workers, which
kept training, and writing checkpoints, next to whatever run was started after them.

:func:`die_with_parent` closes one link: on Linux it asks the kernel for SIGKILL when the
parent dies (``prctl(PR_SET_PDEATHSIG)``), elsewhere a daemon thread polls the parent pid.
Both links are closed: the agent runs through this module's bootstrap
(``python -m unimm.titan.lifeline torch.distributed.run ...``, so it dies with the launcher)
and each worker calls :func:`die_with_parent` first thing in ``unimm.titan.train`` (so it
dies with the agent, also under a torchrun started by hand).

The kernel sends the signal when the *thread* that forked the process exits. The launcher
and torchrun's agent both start their children from the thread that then waits for them, so
that is the parent's life; a worker started without torchrun (no agent) is not tied, since
its parent could be any thread of any program (``unimm.titan.train`` checks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
WATCHDOG_INTERVAL_S = 0.5
PARENT_ENV = "UNIMM_PARENT_PID"
"""The pid a tied process expects as its parent, set by that parent for its children: a child
that starts after its parent died (its parent pid is then init's or a subreaper's) dies at
once instead of running untied."""


def _prctl_pdeathsig(sig: int) -> bool:
    """PR_SET_PDEATHSIG through libc; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, sig: int) -> None:
    while True:
        time.sleep(WATCHDOG_INTERVAL_S)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)
            os._exit(128 + int(sig))  # where sig could be caught or ignored


def expected_parent() -> int | None:
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() else None


def die_with_parent(sig: int = signal.SIGKILL, expected: int | None = None) -> str:
    """Have this process receive ``sig`` when its parent exits; returns how ("prctl" or
    "watchdog"). If the parent is already gone (or is not ``expected``), ``sig`` comes at once."""
    parent = os.getppid()
    if expected is not None and parent != expected:
        os.kill(os.getpid(), sig)
    how = "prctl" if _prctl_pdeathsig(sig) else "watchdog"
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent, sig), name="unimm-lifeline", daemon=True).start()
    # The parent may have died before the kernel (or the thread) was watching: this process
    # was then handed to init or a subreaper, and its parent pid changed.
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return how


def main(argv: list[str] | None = None) -> None:
    """``python -m unimm.titan.lifeline MODULE [ARGS...]``: run MODULE as ``__main__`` (as
    ``python -m MODULE ARGS...`` would) in a process that dies with its parent."""
    import runpy

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m unimm.titan.lifeline MODULE [ARGS...]")
    die_with_parent(expected=expected_parent())
    os.environ[PARENT_ENV] = str(os.getpid())  # MODULE's children: tie them to this process
    module, sys.argv = argv[0], [argv[0], *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
