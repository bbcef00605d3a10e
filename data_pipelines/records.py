"""Row-addressable reading of the table-like inputs: JSONL (optionally gzipped), Parquet, text.

Jobs cut their inputs into shard tasks by record ranges, so each reader can count a file's
records and read any range [start, stop) of them. A record is a dict: a JSON object, a Parquet
row, or ``{"text": whole file}`` for a .txt file. A line that is not a JSON object is
reported as (index, None, reason) so the job can skip and count it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unimm.errors import ConfigError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")


def _kind(path: Path) -> str:
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return suffix
    raise ConfigError(f"{path}: unsupported input (expected one of {', '.join(SUFFIXES)})")


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line


def count_records(path: Path) -> int:
    kind = _kind(path)
    if kind == ".txt":
        return 1
    if kind == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in _lines(path))


def _parquet_rows(path: Path, start: int, stop: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    first = 0  # index of the current row group's first row
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if first + rows > start and first < stop:
            table = pf.read_row_group(group)
            lo, hi = max(start - first, 0), min(stop - first, rows)
            yield from table.slice(lo, hi - lo).to_pylist()
        first += rows


def read_records(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict | None, str]]:
    """(index, record, "") for good records in [start, stop); (index, None, reason) for bad ones."""
    kind = _kind(path)
    stop = count_records(path) if stop is None else stop
    if kind == ".txt":
        if start == 0 < stop:
            yield 0, {"text": path.read_text(encoding="utf-8", errors="replace")}, ""
        return
    if kind == ".parquet":
        yield from ((start + i, row, "") for i, row in enumerate(_parquet_rows(path, start, stop)))
        return
    for index, line in enumerate(_lines(path)):
        if index >= stop:
            return
        if index < start:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, None, f"invalid JSON ({exc.msg})"
            continue
        if isinstance(record, dict):
            yield index, record, ""
        else:
            yield index, None, "JSON line is not an object"


def expand_inputs(paths: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named directly, plus those under named folders with a matching suffix; sorted, so
    the task list (and hence every shard's content) does not depend on directory order."""
    found: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"input {p} does not exist")
    if not found:
        raise ConfigError(f"no input files among {[str(p) for p in paths]} (suffixes {', '.join(suffixes)})")
    return found


def record_tasks(files: list[Path], per_shard: int) -> list[tuple[str, int, int]]:
    """(file, start, stop) ranges of at most `per_shard` records, one file per range."""
    if per_shard <= 0:
        raise ConfigError(f"--per-shard must be positive, got {per_shard}")
    ranges = []
    for f in files:
        n = count_records(f)
        ranges += [(str(f), s, min(s + per_shard, n)) for s in range(0, n, per_shard)]
    return ranges
