"""Data path: procedural generators -> shards -> reader -> documents -> packer -> loader."""

from __future__ import annotations

import itertools
import logging
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from unimm.data_pipelines import procedural
from unimm.data_pipelines.raw_pixels import RawPixels, patchify, unpatchify
from unimm.data_pipelines.write_shards import ensure_procedural_shards

from unimm.data.batch import BATCH_KEYS, IGNORE_INDEX, NO_FRAME, TEXT, VISION
from unimm.data.loader import MultimodalDataLoader, PackedMultimodalDataset
from unimm.data.packer import Packer, pack_row
from unimm.data.sequences import assemble, build_document
from unimm.data.shards import ShardCursor, load_manifest, read_samples
from unimm.tokenizer import ByteTokenizer

TK = ByteTokenizer()
C = 192  # 8 x 8 patches x 3 channels
SETTINGS = dict(
    num_images=48, num_videos=16, num_texts=48, image_size=32, patch=8, samples_per_shard=8, seed=0
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_procedural_shards(tmp_path_factory.mktemp("cache"), **SETTINGS)


def _dataset(folder: Path, **kw) -> PackedMultimodalDataset:
    args = dict(manifest=load_manifest(folder, C), tokenizer=TK, seq_len=256, local_batch_size=2)
    return PackedMultimodalDataset(**{**args, **kw})


def _take(dataset: PackedMultimodalDataset, n: int) -> list:
    return [dataset.next_batch() for _ in range(n)]


def _assert_batches_equal(a, b) -> None:
    (xa, ya), (xb, yb) = a, b
    assert xa.keys() == xb.keys()
    for k in xa:
        torch.testing.assert_close(xa[k], xb[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)


# ---------------------------------------------------------------- generators


def test_generators_are_deterministic_and_truthful():
    a, b = procedural.image_sample(7, seed=3), procedural.image_sample(7, seed=3)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    assert not np.array_equal(a["image"], procedural.image_sample(7, seed=4)["image"])
    for i in range(30):
        s = procedural.image_sample(i, seed=0)
        objs = s["objects"]
        assert 1 <= len(objs) <= 3
        assert all(o.name in s["caption"] for o in objs)
        for o in objs:  # inside the canvas, and the centre pixel has the object's colour
            assert o.radius <= o.centre[0] <= 32 - o.radius and o.radius <= o.centre[1] <= 32 - o.radius
            px = s["image"][int(o.centre[1]), int(o.centre[0])].astype(int)
            assert np.abs(px - procedural.COLOURS[o.colour]).max() < 40
        for p, q in itertools.combinations(objs, 2):
            assert math.dist(p.centre, q.centre) >= p.radius + q.radius

    v1, v2 = (
        procedural.video_sample(5, seed=0, num_frames=4),
        procedural.video_sample(5, seed=0, num_frames=4),
    )
    assert np.array_equal(v1["frames"], v2["frames"]) and v1["caption"] == v2["caption"]
    assert v1["frames"].shape == (4, 32, 32, 3)
    assert v1["caption"].endswith(v1["direction"]) or "bouncing" in v1["caption"]
    for i in range(20):
        v = procedural.video_sample(i, seed=0)
        if not v["bounced"]:  # constant velocity along the named direction
            steps = np.diff(np.array(v["centres"]), axis=0)
            expected = np.array(procedural.DIRECTIONS[v["direction"]]) * v["speed"]
            np.testing.assert_allclose(steps, np.broadcast_to(expected, steps.shape), atol=1e-9)

    assert procedural.text_sample(3, seed=0) == procedural.text_sample(3, seed=0)
    texts = {procedural.text_sample(i, seed=0)["text"] for i in range(50)}
    assert len(texts) == 50 and all(t.endswith(".") for t in texts)


# ---------------------------------------------------------------- raw pixels


def test_patchify_round_trip():
    enc = RawPixels(image_size=32, patch=8)
    assert (enc.tokens_per_frame, enc.latent_dim) == (16, 192)
    assert (RawPixels(224, 14).tokens_per_frame, RawPixels(224, 14).latent_dim) == (256, 588)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 3, 32, 32, 3), dtype=np.uint8)
    lat = enc.encode(images)
    assert lat.shape == (2, 3, 16, 192) and lat.dtype == np.float32
    assert lat.min() >= -1 and lat.max() <= 1
    # raster order: patch 1 is the top row, second column; channels fastest
    np.testing.assert_allclose(lat[0, 0, 1], images[0, 0, :8, 8:16].reshape(-1) / 127.5 - 1, atol=1e-6)
    assert np.array_equal(enc.decode(lat), images)
    assert np.array_equal(enc.decode(lat.astype(np.float16)), images)  # the shard dtype is lossless here
    assert np.array_equal(unpatchify(patchify(images[0, 0], 4), 4, 32), images[0, 0])
    with pytest.raises(ValueError):
        RawPixels(30, 8)


# ---------------------------------------------------------------- shards


def test_shards_hold_the_generated_data(shards):
    manifest = load_manifest(shards, C)
    info = manifest.info
    assert (info["tokens_per_frame"], info["encoder"], info["patch"], info["image_size"]) == (
        16,
        "raw_pixels",
        8,
        32,
    )
    assert info["counts"] == {"text": 48, "image_text": 48, "video": 16}
    assert len(manifest.sources["image_text"]) == 6 and len(manifest.sources["video"]) == 2
    counters: dict[str, int] = {}
    images = list(read_samples(manifest.sources["image_text"], 16, C, counters))
    assert len(images) == 48 and counters == {"samples": 48}
    expected = procedural.image_sample(5, seed=0)
    assert images[5]["caption"] == expected["caption"] and images[5]["key"] == "image-00000005"
    assert np.array_equal(RawPixels(32, 8).decode(images[5]["latents"][0]), expected["image"])
    videos = list(read_samples(manifest.sources["video"], 16, C))
    assert videos[0]["latents"].shape == (4, 16, C) and videos[0]["kind"] == "video"
    texts = list(read_samples(manifest.sources["text"], 16, C))
    assert texts[0]["latents"] is None and texts[0]["text"] == procedural.text_sample(0, seed=0)["text"]


def test_ensure_procedural_shards_is_idempotent_and_race_safe(tmp_path, shards):
    small = dict(num_images=4, num_videos=2, num_texts=4, samples_per_shard=2)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_procedural_shards(tmp_path, **small)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and (results[0] / "manifest.json").is_file()
    assert ensure_procedural_shards(tmp_path, **small) == results[0]
    assert ensure_procedural_shards(tmp_path, **small, image_size=32) == results[0]  # defaults spelled out
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temporary folders left
    assert ensure_procedural_shards(tmp_path, **{**small, "seed": 1}) != results[0]
    assert ensure_procedural_shards(shards.parent, **SETTINGS) == shards


def test_latent_width_mismatch_names_the_manifest(shards):
    with pytest.raises(ValueError) as err:
        load_manifest(shards, 588)
    msg = str(err.value)
    assert str(shards / "manifest.json") in msg and "192" in msg and "588" in msg
    cfg = MultimodalDataLoader.Config(shards=str(shards), latent_dim=588)
    with pytest.raises(ValueError, match="manifest.json"):
        cfg.build(dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=256, local_batch_size=2)


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = np.zeros((1, 16, C), np.float16)
    shard = tmp_path / "bad.tar"
    _write_tar(
        shard,
        [
            {
                "__key__": "ok1",
                "json": {"kind": "image_text", "caption": "a red circle"},
                "latents.npy": good,
            },
            {
                "__key__": "wrongshape",
                "json": {"kind": "image_text", "caption": "x"},
                "latents.npy": np.zeros((1, 16, 10), np.float16),
            },
            {"__key__": "nojson", "latents.npy": good},
            {"__key__": "nolatents", "json": {"kind": "video", "caption": "x"}},
            {"__key__": "badjson", "json": b"{not json", "latents.npy": good},
            {
                "__key__": "twoframes",
                "json": {"kind": "image_text", "caption": "x"},
                "latents.npy": np.zeros((2, 16, C), np.float16),
            },
            {
                "__key__": "nan",
                "json": {"kind": "video", "caption": "x"},
                "latents.npy": np.full((2, 16, C), np.nan, np.float16),
            },
            {"__key__": "ok2", "json": {"kind": "text", "text": "hello."}},
        ],
    )
    counters: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        keys = [s["key"] for s in read_samples([shard], 16, C, counters)]
    assert keys == ["ok1", "ok2"]
    assert counters == {"samples": 2, "bad_samples": 6}
    warned = " ".join(r.getMessage() for r in caplog.records)
    for key in ("wrongshape", "nojson", "nolatents", "badjson", "twoframes", "nan"):
        assert key in warned
    assert str(shard) in warned

    # A truncated shard is read up to the damage, then left; the endless cursor carries on.
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    cursor = ShardCursor(
        "mixed", [shard, cut], stream=0, num_streams=1, seed=0, tokens_per_frame=16, latent_dim=C
    )
    seen = [cursor.next()["key"] for _ in range(8)]
    assert set(seen) <= {"ok1", "ok2"} and cursor.epoch >= 1
    assert cursor.counters["bad_samples"] > 0 and cursor.counters["read_errors"] > 0

    only_bad = tmp_path / "only_bad.tar"
    _write_tar(only_bad, [{"__key__": "nojson", "latents.npy": good}])
    with pytest.raises(RuntimeError, match="no usable sample"):
        ShardCursor(
            "bad", [only_bad], stream=0, num_streams=1, seed=0, tokens_per_frame=16, latent_dim=C
        ).next()


# ---------------------------------------------------------------- documents


def _fields(doc):
    return (
        doc.tokens.tolist(),
        doc.modality.tolist(),
        doc.frames.tolist(),
        doc.denoise.tolist(),
        doc.labels.tolist(),
    )


def test_sequence_formats_by_hand():
    bos, eos, boi, eoi, pad, ign = TK.bos_id, TK.eos_id, TK.boi_id, TK.eoi_id, TK.pad_id, IGNORE_INDEX
    h, i = ord("h"), ord("i")
    T, V = TEXT, VISION
    lat = np.arange(4 * 3, dtype=np.float32).reshape(1, 4, 3)
    image = {"kind": "image_text", "caption": "hi", "latents": lat}
    rng = np.random.default_rng(0)

    gen = build_document(image, TK, rng, latent_dim=3, p_understanding=0.0, cond_dropout=0.0)
    assert _fields(gen) == (
        [bos, h, i, boi, pad, pad, pad, pad, eoi, eos],
        [T, T, T, T, V, V, V, V, T, T],
        [-1, -1, -1, -1, 0, 0, 0, 0, -1, -1],
        [False] * 4 + [True] * 4 + [False] * 2,
        [h, i, boi, ign, ign, ign, ign, ign, eos, ign],
    )
    assert np.array_equal(gen.latents, lat[0])

    und = build_document(image, TK, rng, latent_dim=3, p_understanding=1.0, cond_dropout=0.0)
    assert _fields(und) == (
        [bos, boi, pad, pad, pad, pad, eoi, h, i, eos],
        [T, T, V, V, V, V, T, T, T, T],
        [-1, -1, 0, 0, 0, 0, -1, -1, -1, -1],
        [False] * 10,
        [boi, ign, ign, ign, ign, ign, h, i, eos, ign],
    )

    uncond = build_document(image, TK, rng, latent_dim=3, p_understanding=0.0, cond_dropout=1.0)
    assert _fields(uncond)[0] == [bos, boi, pad, pad, pad, pad, eoi, eos]
    assert _fields(uncond)[4] == [boi, ign, ign, ign, ign, ign, eos, ign]

    text = build_document({"kind": "text", "text": "hi"}, TK, rng, latent_dim=3)
    assert _fields(text) == ([bos, h, i, eos], [T] * 4, [-1] * 4, [False] * 4, [h, i, eos, ign])
    assert text.latents.shape == (0, 3)

    video = {"kind": "video", "caption": "h", "latents": np.ones((2, 2, 3), np.float32)}
    vid = build_document(video, TK, rng, latent_dim=3, cond_dropout=0.0)
    assert _fields(vid) == (
        [bos, h, boi, pad, pad, eoi, boi, pad, pad, eoi, eos],
        [T, T, T, V, V, T, T, V, V, T, T],
        [-1, -1, -1, 0, 0, -1, -1, 1, 1, -1, -1],
        [False] * 3 + [True] * 2 + [False] * 2 + [True] * 2 + [False] * 2,
        [h, boi, ign, ign, ign, boi, ign, ign, ign, eos, ign],
    )


def test_direction_and_dropout_rates():
    image = {"kind": "image_text", "caption": "c", "latents": np.zeros((1, 4, 3), np.float32)}
    rng = np.random.default_rng(1)
    docs = [build_document(image, TK, rng, latent_dim=3) for _ in range(4000)]
    understanding = sum(
        d.modality[1] == TEXT and d.tokens[1] == TK.boi_id and not d.denoise.any() for d in docs
    )
    dropped = sum(len(d) == 8 and d.denoise.any() for d in docs)
    assert abs(understanding / 4000 - 0.5) < 0.03
    assert abs(dropped / (4000 - understanding) - 0.1) < 0.02


# ---------------------------------------------------------------- packer


def _random_doc(rng: np.random.Generator, latent_dim: int = 3):
    segs: list = [list(rng.integers(0, 256, size=int(rng.integers(1, 6))))]
    for _ in range(int(rng.integers(0, 3))):
        segs += [(rng.normal(size=(4, latent_dim)).astype(np.float32), bool(rng.random() < 0.5)), [TK.eoi_id]]
    return assemble(segs, TK.pad_id, latent_dim)


def test_packer_invariants():
    rng = np.random.default_rng(0)
    docs = [_random_doc(rng) for _ in range(300)]
    feed = iter(docs)
    packer = Packer(seq_len=32, latent_dim=3, pad_id=TK.pad_id)
    packed: list = []
    for _ in range(60):
        row = packer.next_row(lambda: next(feed))
        L = 32
        assert all(len(v) == L for v in row.values()) and row["latents"].shape == (L, 3)
        ids = row["document_ids"]
        assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for d in np.unique(ids):
            span = np.flatnonzero(ids == d)
            assert np.array_equal(row["positions"][span], np.arange(len(span)))
        vis = row["modality"] == VISION
        assert np.all((row["frame_ids"] == NO_FRAME) == ~vis)
        assert np.all(row["labels"][vis] == IGNORE_INDEX) and not row["denoise"][~vis].any()
        for f in np.unique(row["frame_ids"][vis]):  # one frame = one contiguous block of one document
            span = np.flatnonzero(row["frame_ids"] == f)
            assert len(span) == 4 and np.all(np.diff(span) == 1) and len(np.unique(ids[span])) == 1
        last = int(ids.max())
        n_docs = (
            last if row["tokens"][ids == last][0] == TK.pad_id else last + 1
        )  # documents never start with <pad>
        used = sum(len(d) for d in docs[len(packed) : len(packed) + n_docs])
        taken = docs[len(packed) : len(packed) + n_docs]
        assert np.array_equal(row["tokens"][:used], np.concatenate([d.tokens for d in taken]))
        assert np.array_equal(row["labels"][:used], np.concatenate([d.labels for d in taken]))
        assert np.array_equal(row["latents"][:used][vis[:used]], np.concatenate([d.latents for d in taken]))
        pad = slice(used, L)
        assert np.all(row["tokens"][pad] == TK.pad_id) and np.all(row["modality"][pad] == TEXT)
        assert np.all(row["labels"][pad] == IGNORE_INDEX) and not row["latents"][pad].any()
        if used < L:
            assert np.all(ids[pad] == n_docs)
            assert used + len(docs[len(packed) + n_docs]) > L  # greedy: the next one did not fit
        packed += taken
    assert packer.too_long == 0 and packer.padding == 60 * 32 - sum(len(d) for d in packed)


def test_packer_skips_documents_longer_than_a_row(caplog):
    short = assemble([[TK.bos_id, 1, 2, TK.eos_id]], TK.pad_id, 3)
    long_doc = assemble([[TK.bos_id], (np.zeros((16, 3), np.float32), True), [TK.eos_id]], TK.pad_id, 3)
    feed = iter([short, long_doc, short, short])
    packer = Packer(seq_len=12, latent_dim=3, pad_id=TK.pad_id)
    with caplog.at_level(logging.WARNING):
        row = packer.next_row(lambda: next(feed))
    assert packer.too_long == 1 and "seq_len 12" in caplog.text
    assert row["document_ids"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert not (row["modality"] == VISION).any()
    with pytest.raises(ValueError):
        pack_row([long_doc], 12, 3, TK.pad_id)


# ---------------------------------------------------------------- loader


def test_loader_batches_follow_the_contract(shards):
    cfg = MultimodalDataLoader.Config(shards=str(shards), latent_dim=C)
    loader = cfg.build(
        dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=256, local_batch_size=2, snapshot_every_n_steps=1
    )
    inputs, labels = next(iter(loader))
    assert set(inputs) == set(BATCH_KEYS)
    assert inputs["latents"].shape == (2, 256, C) and inputs["latents"].dtype == torch.float32
    assert labels.shape == (2, 256) and inputs["denoise"].dtype == torch.bool
    for k in ("tokens", "modality", "document_ids", "frame_ids", "positions"):
        assert inputs[k].shape == (2, 256) and inputs[k].dtype == torch.int64
    stats = loader.stats()
    assert stats["rows"] == 2 and stats["bad_samples"] == 0 and stats["samples"] >= 2
    with pytest.raises(ValueError, match="latent_dim is unset"):
        MultimodalDataLoader.Config(shards=str(shards)).build(
            dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=256, local_batch_size=2
        )


def test_source_weights_select_sources(shards):
    ds = _dataset(shards, source_weights={"text": 1.0, "video": 0.0})
    _take(ds, 2)
    assert set(k for k in ds.stats() if k.startswith("documents/")) == {"documents/text"}
    with pytest.raises(ValueError, match="no shards for weighted sources"):
        _dataset(shards, source_weights={"text": 1.0, "audio": 1.0})


@pytest.mark.parametrize("num_streams", [2, 4])  # 4 streams > 2 video shards: records are split instead
def test_one_rank_equals_two_ranks(shards, num_streams):
    single = _dataset(shards, local_batch_size=4, num_streams=num_streams)
    ranks = [
        _dataset(shards, local_batch_size=2, num_streams=num_streams, dp_rank=r, dp_world_size=2)
        for r in (0, 1)
    ]
    for _ in range(4):
        x, y = single.next_batch()
        parts = [d.next_batch() for d in ranks]
        joined = ({k: torch.cat([p[0][k] for p in parts]) for k in x}, torch.cat([p[1] for p in parts]))
        _assert_batches_equal((x, y), joined)
    assert not torch.equal(parts[0][0]["tokens"], parts[1][0]["tokens"])  # streams differ


def test_stream_layout_is_validated(shards):
    with pytest.raises(ValueError, match="not divisible by the data-parallel world size"):
        _dataset(shards, num_streams=3, dp_world_size=2)
    with pytest.raises(ValueError, match="local_batch_size 3"):
        _dataset(shards, num_streams=2, local_batch_size=3)


def test_resume_is_exact(shards):
    cfg = MultimodalDataLoader.Config(shards=str(shards), latent_dim=C, num_streams=2)
    build = dict(
        dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=1024, local_batch_size=4, snapshot_every_n_steps=1
    )
    loader = cfg.build(**build)
    it = iter(loader)
    for _ in range(8):
        next(it)
    # Saved after every stream has started a second pass over its text shards, in a new order.
    assert all(s.cursors["text"].epoch >= 1 for s in loader.dataset.streams)
    state = loader.state_dict()
    expected = [next(it) for _ in range(6)]

    resumed = cfg.build(**build)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(6), resumed)]
    for a, b in zip(expected, got):
        _assert_batches_equal(a, b)
    assert resumed.stats() == loader.stats()


def test_dataset_state_restores_packer_carry(shards):
    ds = _dataset(shards)
    for _ in range(5):
        ds.next_batch()
        if ds.streams[0].packer.carry is not None:
            break
    assert ds.streams[0].packer.carry is not None
    state = ds.state_dict()
    fresh = _dataset(shards)
    fresh.load_state_dict(state)
    for a, b in zip(_take(ds, 3), _take(fresh, 3)):
        _assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="stream layout"):
        _dataset(shards, num_streams=2, local_batch_size=2).load_state_dict(state)


def test_procedural_default_source(tmp_path):
    cfg = MultimodalDataLoader.Config(
        cache_dir=str(tmp_path), latent_dim=C, num_images=8, num_videos=4, num_texts=8, samples_per_shard=4
    )
    loader = cfg.build(dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=256, local_batch_size=1)
    inputs, _ = next(iter(loader))
    assert inputs["tokens"].shape == (1, 256)
    assert len(list(tmp_path.glob("procedural-*/manifest.json"))) == 1
