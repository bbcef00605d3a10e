"""Training entry point run by torchrun on every rank (``python -m unimm.titan.train``).

It is torchtitan's own ``train.main`` with these differences:

- Under torchrun, the rank dies with torchrun's agent (``unimm.titan.lifeline``), set up
  first, before the slow imports: torchrun starts workers in sessions of their own, so
  without it a SIGKILL to the launch left them training.
- Started by hand (``torchrun ... -m unimm.titan.train``, or one process without torchrun)
  rather than by ``unimm train``, rank 0 checks the config as ``unimm train`` would
  (``unimm.titan.config_checks``) and holds the run folder's lock for its life
  (``unimm.titan.run_lock``); under ``unimm train`` the launcher holds it for the run.
- Configuration mistakes (``ConfigError``, a locked run folder included) end the rank with a
  one-line message instead of a stack trace (exit 2), and so do deliberate stops that protect
  the run's results (``RunStopped``: a diverged run, no intact checkpoint, too much bad data;
  exit 3).
"""

from __future__ import annotations

import os
import sys

from unimm.errors import ConfigError, RunStopped

_run_lock = None
"""Rank 0's lock of the run folder when started by hand; released when the process exits."""


def _die_with_agent() -> None:
    # torchrun's agent sets TORCHELASTIC_RUN_ID for its workers and starts them from its
    # main thread, which lives as long as the agent. Without torchrun the parent could be
    # any thread of any program, so nothing is tied.
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        from unimm.titan.lifeline import die_with_parent, expected_parent

        die_with_parent(expected=expected_parent())


def _guard_run_folder(argv: list[str]) -> None:
    """Rank 0, unless ``unimm train`` holds the run folder's lock for it: check the config and
    take the lock (RunLockedError, a ConfigError, when another live run has the folder)."""
    global _run_lock
    if os.environ.get("RANK", "0") != "0":
        return
    from torchtitan.config import ConfigManager

    from unimm.titan.config_checks import check_config
    from unimm.titan.run_lock import RunLock, held_for_us

    config = ConfigManager().parse_args(argv)
    if held_for_us(config.dump_folder):
        return  # unimm train checked the config and holds the lock
    for warning in check_config(config, int(os.environ.get("WORLD_SIZE", "1"))):
        print(f"unimm: warning: {warning}", file=sys.stderr)
    _run_lock = RunLock(config.dump_folder, role="unimm.titan.train rank 0").acquire()


def main() -> None:
    _die_with_agent()

    from torchtitan.train import main as torchtitan_main

    from unimm.titan import compat

    compat.apply()
    try:
        _guard_run_folder(sys.argv[1:])
        torchtitan_main()
    except ConfigError as err:
        print(f"unimm: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"unimm: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(3)
    finally:
        if _run_lock is not None:
            _run_lock.release()


if __name__ == "__main__":
    main()
