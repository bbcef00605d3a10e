"""What a fresh install of the newest releases would change against the lock.

``python tools/lock_drift.py requirements.lock PYTHON`` lists every package whose version in
PYTHON's environment differs from the lock's pin (and packages only one side has), so that a
red ``make test-latest`` points at the releases that moved. Prints; always exits 0.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def installed_versions(python: str) -> dict[str, str]:
    listing = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
    ).stdout
    return {canonical(row["name"]): row["version"] for row in json.loads(listing)}


def drift(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(locked.keys() | installed.keys()):
        old, new = locked.get(name), installed.get(name)
        if old != new and not (old is None and name in {"pip", "torch", "triton", "unimm"}):
            rows.append(f"  {name}: {old or '(not locked)'} -> {new or '(not installed)'}")
    return rows


def main(argv: list[str]) -> int:
    lock, python = Path(argv[0]), argv[1]
    rows = drift(locked_versions(lock), installed_versions(python))
    print(f"{len(rows)} packages differ from {lock}:" if rows else f"every package matches {lock}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
