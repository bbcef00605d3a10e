"""Reading shard tars record by record, so that damaged data is found, skipped and accounted.

Why not webdataset's tar iteration (1.0.2: ``tariterators.tar_file_expander`` and
``group_by_keys`` over ``tarfile.open(mode="r|*")``). Measured on a bad-data corpus written
with GNU tar (20 samples a shard; docs/reliability.md, "Data faults"):

- tarfile's ``TarFile.next()`` treats a header it cannot parse (bad checksum, a header cut
  short, the end of the file where a header should be) as the end of the archive, without an
  exception, unless it is the first header. So a shard cut at a member or record boundary, or
  with garbage over one header, just ends early; no error handler is called, and the rest of
  the shard (14 to 17 of 20 samples at the cuts measured) is lost without a word.
- A member cut inside its data raises from ``extractfile().read()``; webdataset's handler is
  called for it, again when the archive iteration fails at the same place, and the incomplete
  sample comes out of ``group_by_keys`` as well: one damaged sample counted three times.
- ``group_by_keys`` raises once per part of an adjacent repeated key (three errors for one
  sample) and cannot see a key repeated further on, which is then trained twice a pass.

tarfile's ``ignore_zeros`` would skip bad headers, but block by block without saying how much
it skipped, and it would read on through real ends of archives. So this module keeps only the
part of tarfile that is right for damaged input, ``TarInfo.frombuf`` (one 512-byte header,
checksum validated), and does the rest itself: it walks the file in 512-byte blocks, and at a
header that does not validate scans forward block by block to the next one that does
(resynchronising), reporting the damaged byte range as a `Fault`; it notices files that end
without the end-of-archive blocks or inside a member; it groups members into records by key
exactly as webdataset does (``base_plus_ext``, extensions lowercased, ``__meta__`` files
skipped); and it flags every record whose key was already seen in the shard. Ustar, GNU
(``L``/``K`` long names) and pax (``x``/``g`` extended headers: ``path``, ``size``) tars are
read, gzip-compressed ones too.

The reader only reports; counting is the caller's (`unimm.data.shards`): every record comes
out once with the faults found while reading it, and the last item of every shard, `End`,
says how many records the shard gave and carries the faults found after the last one. A
caller that knows how many samples a shard holds counts the missing ones as lost.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

BLOCK = tarfile.BLOCKSIZE
# webdataset's tar_file_iterator skips these (and so do we): metadata, not sample parts.
_META = re.compile(r"__[^/]*__($|/)")
_CHUNK = 1 << 24  # read big members in pieces: a damaged size field must not allocate wildly
_READ_ERRORS = (OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class Fault:
    """One damaged place in a shard: where it starts (bytes from the start of the tar data)
    and what was wrong and skipped there."""

    offset: int
    what: str

    def __str__(self) -> str:
        return f"at byte {self.offset}: {self.what}"


@dataclass
class Record:
    """The members of one key, in stored order: ``parts`` maps the extension (``json``,
    ``tokens.npy``, ...) to the member's bytes."""

    key: str
    offset: int  # byte offset of the header of its first member
    parts: dict[str, bytes]
    faults: list[Fault] = field(default_factory=list)
    """Damage found while reading this record: just before it, or between its members."""
    note: str = ""
    """Damage next to the record that may have cost it parts (for the message, not counted)."""
    duplicate_of: int | None = None
    """Offset of an earlier record of the same key in this shard, if there is one."""


@dataclass(frozen=True)
class End:
    """The last item of every shard."""

    records: int  # records the shard gave
    faults: list[Fault]  # damage after the last record
    truncated: bool  # data is missing at the end (cut short, unreadable from some point)
    unreadable: bool = False  # the file could not be opened or read at all
    damage: tuple[int, ...] = ()  # offsets of every fault in the shard, for messages


def _parse(block: bytes) -> tarfile.TarInfo | None:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return None


def _pax_fields(data: bytes) -> dict[str, str]:
    """``path`` and ``size`` of a pax extended header ("LEN key=value\\n" records)."""
    fields, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError(f"bad record length {length}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


class _Blocks:
    """A file read forward in blocks, with the byte position of what comes next."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.pos = stream, 0

    def read(self, n: int) -> bytes:
        if n <= _CHUNK:
            data = self.stream.read(n)
        else:
            pieces, left = [], n
            while left:
                piece = self.stream.read(min(left, _CHUNK))
                pieces.append(piece)
                left -= len(piece)
                if not piece:
                    break
            data = b"".join(pieces)
        self.pos += len(data)
        return data


def _members(blocks: _Blocks, faults: list[Fault]) -> Iterator[tuple[str, int, bytes]]:
    """(name, header offset, data) of every regular member, in order; faults are appended to
    `faults` as they are found. Returns True when the archive ended properly, False when it
    is cut short (the generator's return value)."""
    long_name, pax = None, {}
    member_at = None  # offset of the first header of the member being read (long-name / pax headers)
    while True:
        at = blocks.pos
        block = blocks.read(BLOCK)
        if not block:
            faults.append(Fault(at, "the file ends without the tar end-of-archive blocks"))
            return False
        if len(block) < BLOCK:
            if block.count(0) == len(block):
                return True  # the end-of-archive blocks themselves are cut short: nothing lost
            faults.append(Fault(at, "the file ends inside a tar header"))
            return False
        info = _parse(block)
        if info is None:
            # A zero block where a header should be ends the archive, unless a valid header
            # follows (a zeroed-out header): then it is damage like any other.
            end, info = _resync(blocks, at, block, faults)
            if info is None:
                return end
            # Damage between an extended header and its member: the extended header is void.
            at, long_name, pax, member_at = blocks.pos - BLOCK, None, {}, None
        if member_at is None:
            member_at = at
        size = info.size
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                faults.append(Fault(at, f"pax size {pax['size']!r} is not a number"))
        data = blocks.read(size)
        if len(data) < size:
            faults.append(Fault(at, f"the file ends inside the data of member {info.name!r}"))
            return False
        padding = -size % BLOCK
        complete = len(blocks.read(padding)) == padding
        if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            try:
                pax = _pax_fields(data)
            except ValueError as exc:
                faults.append(Fault(at, f"unreadable pax header ({exc}); its fields are ignored"))
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):
            pass  # global pax header, long link name: nothing a sample needs
        else:
            name = long_name or pax.get("path") or info.name
            if info.type == tarfile.GNUTYPE_SPARSE:
                faults.append(Fault(at, f"sparse member {name!r} skipped (not a shard member)"))
            elif info.isreg():
                yield name, member_at, data
            long_name, pax, member_at = None, {}, None
        if not complete:
            faults.append(Fault(blocks.pos, "the file ends inside the padding after a member"))
            return False


def _resync(
    blocks: _Blocks, at: int, block: bytes, faults: list[Fault]
) -> tuple[bool, tarfile.TarInfo | None]:
    """Scan from the bad (or zero) block `block` at `at` to the next valid header. Returns
    (whether the archive ended properly, the header found, or None at the end of the file)."""
    what = "zero blocks where a tar header should be" if block.count(0) == BLOCK else "bad tar header"
    data_seen = what == "bad tar header"  # non-zero blocks that are no header
    tail_zero = not data_seen
    while True:
        nxt = blocks.read(BLOCK)
        if len(nxt) < BLOCK:
            if not data_seen:
                return True, None  # only zero blocks to the end: the end of the archive
            if nxt:
                tail_zero = nxt.count(0) == len(nxt)
            skipped = blocks.pos - at
            cut = "" if tail_zero else ", and the file ends without the end-of-archive blocks"
            faults.append(Fault(at, f"{what}; {skipped} bytes to the end of the file skipped{cut}"))
            return tail_zero, None
        info = _parse(nxt)
        if info is not None:
            skipped = blocks.pos - BLOCK - at
            faults.append(Fault(at, f"{what}; {skipped} bytes skipped to the next valid header"))
            return True, info
        tail_zero = nxt.count(0) == BLOCK
        data_seen = data_seen or not tail_zero


def read_records(path: str | Path) -> Iterator[Record | End]:
    """Every record of the tar at `path` once, in stored order, then one `End`. Never raises
    for bad data or an unreadable file: those come out as faults (and an `End` with
    ``unreadable``). Closing the generator closes the file."""
    path = Path(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        yield End(0, [Fault(0, f"the shard cannot be opened ({exc!r})")], truncated=True, unreadable=True, damage=(0,))
        return
    with raw:
        try:
            gzipped = raw.peek(2)[:2] == b"\x1f\x8b"
        except OSError as exc:
            yield End(0, [Fault(0, f"the shard cannot be read ({exc!r})")], truncated=True, unreadable=True, damage=(0,))
            return
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        yield from _records(_Blocks(stream))


def _records(blocks: _Blocks) -> Iterator[Record | End]:
    faults: list[Fault] = []  # found and not yet handed out with a record
    damage: list[int] = []
    seen: dict[str, int] = {}
    count, current = 0, None
    members = _members(blocks, faults)
    ended = False
    while True:
        try:
            name, offset, data = next(members)
        except StopIteration as stop:
            ended = bool(stop.value)
            break
        except _READ_ERRORS as exc:
            faults.append(Fault(blocks.pos, f"reading failed ({exc!r})"))
            break
        finally:
            damage += [f.offset for f in faults if f.offset not in damage]
        prefix, suffix = base_plus_ext(name)
        if prefix is None or _META.match(name):
            continue
        suffix = suffix.lower()
        if current is not None and prefix == current.key and suffix not in current.parts:
            if faults:  # damage between two members of one record
                current.faults += faults
                current.note = "; ".join(map(str, faults))
                faults.clear()
            current.parts[suffix] = data
            continue
        if current is not None:
            count += 1
            yield current
        current = Record(prefix, offset, {suffix: data}, faults=list(faults), duplicate_of=seen.get(prefix))
        if faults:
            current.note = "; ".join(map(str, faults))
        faults.clear()
        seen.setdefault(prefix, offset)
    if current is not None:
        if faults:  # the damage that ended the shard may have cut this record short
            current.note = "; ".join(map(str, faults))
        count += 1
        yield current
    yield End(count, list(faults), truncated=not ended, damage=tuple(damage))
