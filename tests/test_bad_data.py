"""Bad data in shards: every sample is read once or counted once (shards.py, tar_records.py).

The corpus is written with the standard library's tarfile, not the project's writer, and then
damaged. Each shard's plan says which of its records are good, bad or lost and why; the
expected counters are computed from the plans and asserted exactly.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_data import BUILD, C, TK, _config, _manifest, _record  # the sample format's helpers

from unimm.data.batch import BATCH_KEYS, PROVENANCE_KEY, padding_mask
from unimm.data.latent_stats import LatentNormalizer
from unimm.data.loader import PackedMultimodalDataset
from unimm.data.shards import COUNTERS, SampleSpec, ShardCursor, load_manifest, read_samples
from unimm.errors import ConfigError, DataError

SOURCE = "bad"
ENCODE = wds.writer.make_encoder(True)  # webdataset's encoding of json / .npy parts to bytes
# The manifest's statistics (`_manifest`): mean 0, std 1 in every channel.
STATS = LatentNormalizer(np.zeros(C, np.float32), np.ones(C, np.float32))
SPEC = SampleSpec(tokens_per_frame=16, latent_dim=C, vocab_size=TK.get_vocab_size(), normalizer=STATS)


# ---------------------------------------------------------------- writing and damaging


@dataclass(frozen=True)
class Member:
    name: str
    header: int  # offset of its (first) header
    data: int  # offset of its data
    size: int

    @property
    def end(self) -> int:
        return self.data + self.size


def _sample(shard: str, i: int, latents: np.ndarray | None = None) -> dict:
    """Sample i of a shard: an image-text pair (json, latents.npy, tokens.npy) for even i, a
    text (json, tokens.npy) for odd i."""
    key = f"{shard}_{i}"
    if i % 2:
        return _record(key, "text", f"text {i} of {shard}.")
    if latents is None:
        latents = np.random.default_rng(i).normal(size=(1, 16, C)).astype(np.float16)
    return _record(key, "image_text", f"picture {i}", latents=latents)


def _write(path: Path, records: list[dict], *, pax: bool = False) -> list[Member]:
    """Write `records` as a tar with the standard library (GNU format like GNU tar; pax with
    fractional mtimes like webdataset's TarWriter, one extended header per member) and the
    shard's sample count next to it, as the data jobs do; returns its members."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        for record in records:
            parts = ENCODE(dict(record))
            for ext in sorted(k for k in parts if not k.startswith("__")):
                info = tarfile.TarInfo(f"{record['__key__']}.{ext}")
                info.size, info.mtime = len(parts[ext]), 1_700_000_000.5 if pax else 1_700_000_000
                tar.addfile(info, io.BytesIO(parts[ext]))
    path.with_name(path.name.removesuffix(".tar") + ".stats.json").write_text(json.dumps({"samples": len(records)}))
    with tarfile.open(path) as tar:
        return [Member(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def _member(members: list[Member], key: str, part: int) -> Member:
    return [m for m in members if m.name.split(".", 1)[0] == key][part]


def _fates_after_cut(records: list[dict], members: list[Member], cut: int) -> list[str]:
    """Per record: good when all its members end before the cut, lost when none does, else
    bad (a part missing)."""
    fates, position = [], 0
    for record in records:
        parts = len([k for k in record if not k.startswith("__")])
        whole = [m.end <= cut for m in members[position : position + parts]]
        position += parts
        fates.append("good" if all(whole) else "bad" if any(whole) else "lost")
    return fates


def _overwrite(data: bytes, at: int, block: bytes) -> bytes:
    return data[:at] + block + data[at + len(block) :]


GARBAGE = np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8).tobytes()
ZEROS = bytes(512)


@dataclass
class Shard:
    path: Path
    keys: list[str]  # records as written (a repeated key appears twice)
    fates: list[str]  # per record: good, bad, lost
    why: str
    read_errors: int = 0

    def good(self) -> list[str]:
        return [k for k, f in zip(self.keys, self.fates) if f == "good"]


def _build_corpus(folder: Path) -> dict[str, Shard]:
    shards: dict[str, Shard] = {}
    n = 8

    def add(name, why, *, records=None, fates=None, damage=None, read_errors=0, plan_cut=None):
        records = records if records is not None else [_sample(name, i) for i in range(n)]
        path = folder / f"{name}.tar"
        members = _write(path, records)
        if damage is not None:
            path.write_bytes(damage(path.read_bytes(), members))
        if plan_cut is not None:  # the plan of a cut follows from where the members end
            computed = _fates_after_cut(records, members, plan_cut(members))
            assert fates is None or fates == computed, (name, fates, computed)
            fates = computed
        fates = fates or ["good"] * len(records)
        shards[name] = Shard(path, [r["__key__"] for r in records], fates, why, read_errors)

    def cut_at(where):
        return lambda data, members: data[: where(members)]

    add("clean", "nothing wrong")
    where = lambda m: _member(m, "cut_member_5", 0).header  # noqa: E731
    add("cut_member", "cut where sample 5's first header starts: 5-7 lost",
        fates=["good"] * 5 + ["lost"] * 3, damage=cut_at(where), plan_cut=where, read_errors=1)
    where = lambda m: _member(m, "cut_inside_4", 1).header  # noqa: E731
    add("cut_inside", "cut at the header of sample 4's second part: 4 has only its json, 5-7 lost",
        fates=["good"] * 4 + ["bad"] + ["lost"] * 3, damage=cut_at(where), plan_cut=where, read_errors=1)
    where = lambda m: _member(m, "cut_header_3", 1).header + 100  # noqa: E731
    add("cut_header", "cut 100 bytes into the header of sample 3's tokens: 3 bad, 4-7 lost",
        fates=["good"] * 3 + ["bad"] + ["lost"] * 4, damage=cut_at(where), plan_cut=where, read_errors=1)
    where = lambda m: 10240  # noqa: E731  (a tar record: 20 blocks)
    add("cut_record", "cut at the first 10240-byte record boundary (inside sample 1)",
        damage=cut_at(where), plan_cut=where, read_errors=1)
    where = lambda m: _member(m, "cut_data_2", 1).data + 3000  # noqa: E731
    add("cut_data", "cut inside sample 2's latents: 2 bad, 3-7 lost",
        fates=["good"] * 2 + ["bad"] + ["lost"] * 5, damage=cut_at(where), plan_cut=where, read_errors=1)

    def garbage(data, members):
        # over the latents header of sample 4 (zero latents: zero blocks inside the skipped
        # data must not pass for the end of the archive), and over sample 5's first header
        data = _overwrite(data, _member(members, "garbage_4", 1).header, GARBAGE)
        return _overwrite(data, _member(members, "garbage_5", 0).header, GARBAGE)

    records = [_sample("garbage", i, np.zeros((1, 16, C), np.float16) if i == 4 else None) for i in range(n)]
    add("garbage", "garbage over two headers: 4 misses its latents, 5 its json",
        records=records, fates=["good"] * 4 + ["bad", "bad"] + ["good"] * 2, damage=garbage, read_errors=2)

    def zeroed(data, members):
        data = _overwrite(data, _member(members, "zeroed_3", 1).header, ZEROS)
        return _overwrite(data, _member(members, "zeroed_7", 1).header, ZEROS)  # the last header

    add("zeroed", "zeros over the tokens headers of samples 3 and 7 (the shard's last header)",
        fates=["good"] * 3 + ["bad"] + ["good"] * 3 + ["bad"], damage=zeroed, read_errors=2)
    samples = [_sample("dup_adjacent", i) for i in range(n)]
    add("dup_adjacent", "sample 3 written twice in a row: the repeat is bad",
        records=samples[:4] + samples[3:], fates=["good"] * 4 + ["bad"] + ["good"] * 4)
    samples = [_sample("dup_far", i) for i in range(n)]
    add("dup_far", "sample 1 written again after sample 6: the repeat is bad",
        records=samples[:7] + [samples[1], samples[7]], fates=["good"] * 7 + ["bad", "good"])
    samples = [_sample("missing", i) for i in range(n)]
    del samples[2]["latents.npy"], samples[3]["tokens.npy"], samples[5]["json"]
    add("missing", "sample 2 has no latents, 3 no tokens, 5 no json",
        records=samples, fates=["good", "good", "bad", "bad", "good", "bad", "good", "good"])
    nan, huge, large = (np.random.default_rng(i).normal(size=(1, 16, C)).astype(np.float32) for i in range(3))
    nan[0, 3, 7], huge[0, 9, 100], large[0, 1, 1] = np.nan, 1e30, 50.0
    samples = [_sample("latents", i, {2: nan, 4: huge, 6: large}.get(i)) for i in range(n)]
    add("latents", "sample 2 has a NaN, 4 a 1e30 (bad); 6 a 50 (50 std: plausible, good)",
        records=samples, fates=["good", "good", "bad", "good", "bad", "good", "good", "good"])

    # Several faults in one shard, to read with split records (fewer shards than streams).
    samples = [_sample("mixed", i) for i in range(10)]
    del samples[4]["tokens.npy"]

    def mixed(data, members):
        data = _overwrite(data, _member(members, "mixed_3", 1).header, GARBAGE)
        return data[: [m for m in members if m.name == "mixed_8.latents.npy"][0].data + 100]

    add("mixed", "3 loses its tokens to garbage, 4 has none, 2 repeats, a cut in 8's latents, 9 lost",
        records=samples[:6] + [samples[2]] + samples[6:],
        fates=["good"] * 3 + ["bad", "bad", "good", "bad", "good", "good", "bad", "lost"],
        damage=mixed, read_errors=2)
    add("deleted", "a good shard, deleted after the loader started")
    return shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Shard]]:
    folder = tmp_path_factory.mktemp("bad_corpus")
    shards = _build_corpus(folder)
    _manifest(folder, {SOURCE: [s.path.name for s in shards.values()]}, latent_dim=C)
    return folder, shards


@pytest.fixture
def fresh(corpus, tmp_path) -> tuple[Path, dict[str, Shard]]:
    """A copy of the corpus that a test may delete shards from."""
    folder, shards = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(folder, copy)
    return copy, {name: Shard(copy / s.path.name, s.keys, s.fates, s.why, s.read_errors) for name, s in shards.items()}


def _expected(shards: list[Shard], deleted: tuple[str, ...] = ()) -> dict[str, int]:
    counts = dict.fromkeys(COUNTERS, 0)
    for s in shards:
        if s.path.stem in deleted:
            counts["unreadable_shards"] += 1
            counts["lost_samples"] += len(s.keys)
            continue
        counts["samples"] += s.fates.count("good")
        counts["bad_samples"] += s.fates.count("bad")
        counts["lost_samples"] += s.fates.count("lost")
        counts["read_errors"] += s.read_errors
    return counts


def _good(shards: list[Shard], deleted: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for s in shards if s.path.stem not in deleted for k in s.good())


# ---------------------------------------------------------------- reading


def test_every_sample_is_read_once_or_counted_once(corpus, caplog):
    folder, shards = corpus
    counters: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="unimm.data.shards"):
        keys = [s["key"] for s in read_samples([s.path for s in shards.values()], SPEC, counters)]
    assert sorted(keys) == _good(list(shards.values()))  # each good sample once, nothing else
    assert {**dict.fromkeys(COUNTERS, 0), **counters} == _expected(list(shards.values()))
    log = [r.getMessage() for r in caplog.records]
    for s in shards.values():
        mine = [line for line in log if str(s.path) in line]
        for key in set(s.keys):  # each bad record once, with shard, key and byte offset
            bad = sum(k == key and f == "bad" for k, f in zip(s.keys, s.fates))
            assert sum(f"sample {key!r} in shard {s.path} at byte " in line for line in mine) == bad, (s.why, key)
        assert sum("damaged tar data in shard" in line and " at byte " in line for line in mine) == s.read_errors, s.why
        lost = s.fates.count("lost")
        assert sum(f"{lost} of its {len(s.keys)} samples could not be read" in line for line in mine) == (lost > 0), s.why
    assert any("duplicate key (its first record in this shard is at byte" in line for line in log)
    assert any("'latents_4'" in line and "implausible latents: channel 100 is 1e+30 standard deviations" in line for line in log)
    assert any("'latents_2'" in line and "non-finite latents" in line for line in log)


def test_a_deleted_shard_is_skipped_and_counted(fresh, caplog):
    folder, shards = fresh
    shards["deleted"].path.unlink()
    counters: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="unimm.data.shards"):
        keys = sorted(s["key"] for s in read_samples([s.path for s in shards.values()], SPEC, counters))
    assert keys == _good(list(shards.values()), deleted=("deleted",))
    assert {**dict.fromkeys(COUNTERS, 0), **counters} == _expected(list(shards.values()), deleted=("deleted",))
    assert f"skipping shard {shards['deleted'].path}: the shard cannot be opened (FileNotFoundError" in caplog.text
    assert f"shard {shards['deleted'].path}: 8 of its 8 samples could not be read" in caplog.text


def _one_pass(cursor: ShardCursor) -> tuple[list[str], dict[str, int]]:
    """The good keys of the cursor's first epoch and its counters once it has started the
    second (which has then counted the second epoch's first sample too)."""
    keys = []
    while True:
        sample = cursor.next()
        if cursor.epoch:
            return keys, dict(cursor.counters)
        keys.append(sample["key"])


def test_shard_cursor_counts_a_pass_exactly_with_a_shard_deleted_mid_run(fresh):
    folder, shards = fresh
    cursor = ShardCursor(SOURCE, [s.path for s in shards.values()], stream=0, num_streams=1, seed=0, spec=SPEC)
    first = cursor.next()["key"]
    assert cursor.shard < cursor._order.index(list(shards).index("deleted")), "deleted must come later in the pass"
    shards["deleted"].path.unlink()
    keys, counters = _one_pass(cursor)
    assert sorted([first] + keys) == _good(list(shards.values()), deleted=("deleted",))
    expected = _expected(list(shards.values()), deleted=("deleted",))
    expected["samples"] += 1  # the second pass's first sample: every shard's first record is good
    if cursor.shard == 1:  # the second pass began with the deleted shard
        expected["unreadable_shards"] += 1
        expected["lost_samples"] += 8
    assert counters == expected


@pytest.mark.parametrize("num_streams", [2, 3])
def test_streams_splitting_a_shard_count_each_sample_once(corpus, num_streams):
    # One shard, more streams: each reads the whole shard and owns every num_streams-th record;
    # together they hand out each good sample once and count each bad, lost or damaged once.
    folder, shards = corpus
    mixed = shards["mixed"]
    keys, total = [], dict.fromkeys(COUNTERS, 0)
    for stream in range(num_streams):
        cursor = ShardCursor(SOURCE, [mixed.path], stream=stream, num_streams=num_streams, seed=0, spec=SPEC)
        got, counters = _one_pass(cursor)
        keys += got
        total = {k: total[k] + counters[k] for k in COUNTERS}
    assert sorted(keys) == sorted(mixed.good())
    expected = _expected([mixed])
    expected["samples"] += num_streams  # records 0 .. num_streams-1 (the next pass's first) are good
    assert total == expected


def test_resume_inside_damaged_shards_is_exact(fresh):
    folder, shards = fresh
    shards["deleted"].path.unlink()
    paths = [s.path for s in shards.values()]
    make = lambda: ShardCursor(SOURCE, paths, stream=0, num_streams=1, seed=3, spec=SPEC)  # noqa: E731
    reference = make()
    states, keys, counters = [], [], []
    total = len(_good(list(shards.values()), deleted=("deleted",)))
    for _ in range(total + 12):  # into the second pass
        states.append(reference.state_dict())
        keys.append(reference.next()["key"])
        counters.append(dict(reference.counters))
    for k in range(0, len(states) - 3):
        resumed = make()
        resumed.load_state_dict(states[k])
        got = [resumed.next()["key"] for _ in range(3)]
        assert got == keys[k : k + 3], k
        assert resumed.counters == counters[k + 2], k  # nothing counted twice, nothing missed


@pytest.mark.parametrize("pax", [False, True], ids=["gnu", "pax"])
def test_random_cuts_lose_nothing_silently(tmp_path, pax):
    rng = np.random.default_rng(11)
    records = []
    for i in range(20):  # mixed kinds and sizes
        frames = int(rng.integers(1, 4))
        if i % 3 == 0:
            records.append(_record(f"r{i:02d}", "text", "words " * int(rng.integers(1, 200))))
        else:
            latents = rng.normal(size=(frames, 16, C)).astype(np.float16)
            records.append(_record(f"r{i:02d}", "video", "moving " * int(rng.integers(0, 30)), latents=latents))
    whole = tmp_path / "whole.tar"
    members = _write(whole, records, pax=pax)
    data = whole.read_bytes()
    end_blocks = max(m.data + -(-m.size // 512) * 512 for m in members)  # where the end-of-archive blocks start
    cuts = random.Random(5).sample(range(len(data)), 50)
    for cut in cuts:
        shard = tmp_path / "cut.tar"
        shard.write_bytes(data[:cut])
        shard.with_name("cut.stats.json").write_text(json.dumps({"samples": 20}))
        counters: dict[str, int] = {}
        keys = [s["key"] for s in read_samples([shard], SPEC, counters)]
        fates = _fates_after_cut(records, members, cut)
        good, bad, lost = (counters.get(k, 0) for k in ("samples", "bad_samples", "lost_samples"))
        assert good + bad + lost == 20, cut
        assert keys == [r["__key__"] for r, f in zip(records, fates) if f == "good"], cut
        assert (bad, lost) == (fates.count("bad"), fates.count("lost")), cut
        assert counters.get("read_errors", 0) == (cut <= end_blocks), cut


def test_gzipped_shards_and_shards_without_a_sample_count(tmp_path, caplog):
    records = [_sample("gz", i) for i in range(6)]
    plain = tmp_path / "plain.tar"
    members = _write(plain, records)
    data = plain.read_bytes()
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(data))
    assert [s["key"] for s in read_samples([packed], SPEC)] == [r["__key__"] for r in records]
    # A tar cut short, then compressed, with no stats file: the cut is found and counted,
    # the number of samples it took cannot be, and the warning says so.
    packed.write_bytes(gzip.compress(data[: _member(members, "gz_3", 0).header]))
    counters: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="unimm.data.shards"):
        keys = [s["key"] for s in read_samples([packed], SPEC, counters)]
    assert keys == ["gz_0", "gz_1", "gz_2"] and counters == {"samples": 3, "read_errors": 1}
    assert "the samples after it are lost, an unknown number (no packed.stats.json" in caplog.text
    # A cut compressed stream, with a stats file: what the decompressor gave is read, the rest lost.
    packed.write_bytes(gzip.compress(data)[:-300])
    packed.with_name("packed.stats.json").write_text(json.dumps({"samples": 6}))
    counters = {}
    keys = [s["key"] for s in read_samples([packed], SPEC, counters)]
    assert len(keys) + counters.get("bad_samples", 0) + counters["lost_samples"] == 6
    assert counters["lost_samples"] >= 1 and counters["read_errors"] == 1


# ---------------------------------------------------------------- loader


def _loader_dataset(folder: Path, **kw) -> PackedMultimodalDataset:
    args = dict(
        manifest=load_manifest(folder, C), tokenizer=TK, seq_len=256, local_batch_size=2,
        source_weights={SOURCE: 1.0}, max_bad_fraction=0.9,
    )
    return PackedMultimodalDataset(**{**args, **kw})


def test_loader_skips_bad_data_and_stops_on_a_flood(fresh):
    folder, shards = fresh
    dataset = _loader_dataset(folder)
    batches = [dataset.next_batch() for _ in range(2)]
    shards["deleted"].path.unlink()  # mid-run
    batches += [dataset.next_batch() for _ in range(12)]  # three passes
    for inputs, _ in batches:  # a 1e30 or NaN never reaches the flow loss
        assert torch.isfinite(inputs["latents"]).all() and inputs["latents"].abs().max() < 1e3
    stats = dataset.stats()
    for name in COUNTERS:
        assert stats[f"{name}/{SOURCE}"] == stats[name]
    assert stats["unreadable_shards"] >= 1 and stats["lost_samples"] >= 8 + 6
    assert stats["bad_samples"] > 0 and stats["read_errors"] > 0
    with pytest.raises(DataError, match=rf"source '{SOURCE}', stream 0: \d+ bad of \d+ samples \(.*\d+ lost.*\) exceeds dataloader.max_bad_fraction=0.1"):
        strict = _loader_dataset(folder, max_bad_fraction=0.1)  # starts (resumes) without the deleted shard
        for _ in range(200):
            strict.next_batch()
    info = json.loads((folder / "manifest.json").read_text())
    info["sources"]["gone"] = ["deleted.tar"]
    (folder / "manifest.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"no shard file of sources \['gone'\] exists"):
        load_manifest(folder, C)  # a source without any shard is a wrong folder, not a fault


def test_loader_resumes_exactly_over_bad_data_and_carries_provenance(corpus):
    folder, shards = corpus
    config = _config(shards=str(folder), source_weights={SOURCE: 1.0}, max_bad_fraction=0.9)
    build = {**BUILD, "snapshot_every_n_steps": 1}
    loader = config.build(**build)
    it = iter(loader)
    good = set(_good(list(shards.values())))
    for _ in range(5):
        inputs, _ = next(it)
        provenance = inputs[PROVENANCE_KEY]
        assert set(inputs) == {*BATCH_KEYS, PROVENANCE_KEY} and len(provenance) == 2
        for row, origins in enumerate(provenance):
            ids = inputs["document_ids"][row]
            last = int(ids.max())
            padded = bool(padding_mask(inputs["tokens"][row], inputs["modality"][row], TK.pad_id)[ids == last].all())
            assert len(origins) == last + 1 - padded  # one (shard, key) per document
            assert all(key in good and Path(shard).name == key.rsplit("_", 1)[0] + ".tar" for shard, key in origins)
    state = loader.state_dict()
    expected = [next(it) for _ in range(6)]
    resumed = config.build(**build)
    resumed.load_state_dict(state)
    for (x, y), (xr, yr) in zip(expected, resumed):
        assert x.keys() == xr.keys() and x[PROVENANCE_KEY] == xr[PROVENANCE_KEY]
        for k in BATCH_KEYS:
            torch.testing.assert_close(x[k], xr[k], rtol=0, atol=0)
        torch.testing.assert_close(y, yr, rtol=0, atol=0)
    assert resumed.stats() == loader.stats()
