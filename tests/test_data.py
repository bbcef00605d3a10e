"""Data path: procedural generators -> shards -> reader -> documents -> packer -> loader.

The offline jobs (tokenizer, text, image-text, video, action, encoders) are in test_pipelines.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from unimm.data_pipelines import navigation, poses, probes, procedural, reasoning
from unimm.data_pipelines.raw_pixels import RawPixels, patchify, unpatchify
from unimm.data_pipelines.write_shards import ensure_procedural_shards

from unimm.data.batch import BATCH_KEYS, IGNORE_INDEX, NO_FRAME, PROVENANCE_KEY, TEXT, VISION
from unimm.data.loader import DEFAULT_SOURCE_WEIGHTS, MultimodalDataLoader, PackedMultimodalDataset
from unimm.data.packer import Packer, empty_rows, pack_row
from unimm.data.sequences import LayoutSettings, assemble, build_document
from unimm.data.shards import MANIFEST_FORMAT, SampleSpec, ShardCursor, load_manifest, read_samples
from unimm.errors import DataError
from unimm.tokenizer import Tokenizer

TK = Tokenizer()
C = 192  # 8 x 8 patches x 3 channels
SPEC = SampleSpec(tokens_per_frame=16, latent_dim=C, vocab_size=TK.get_vocab_size())
SETTINGS = dict(
    num_images=48, num_videos=16, num_texts=48, num_actions=16, image_size=32, patch=8, samples_per_shard=8, seed=0
)
BUILD = dict(dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=256, local_batch_size=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_procedural_shards(tmp_path_factory.mktemp("cache"), **SETTINGS)


def _dataset(folder: Path, **kw) -> PackedMultimodalDataset:
    args = dict(manifest=load_manifest(folder, C), tokenizer=TK, seq_len=256, local_batch_size=2)
    return PackedMultimodalDataset(**{**args, **kw})


def _config(**kw) -> MultimodalDataLoader.Config:
    return MultimodalDataLoader.Config(**{"latent_dim": C, "vocab_size": TK.get_vocab_size(), **kw})


def _take(dataset: PackedMultimodalDataset, n: int) -> list:
    return [dataset.next_batch() for _ in range(n)]


def _assert_batches_equal(a, b) -> None:
    # Loader batches carry their samples' (shard, key) lists; `next_batch` gives tensors only.
    (xa, ya), (xb, yb) = a, b
    xa, xb = dict(xa), dict(xb)
    pa, pb = xa.pop(PROVENANCE_KEY, None), xb.pop(PROVENANCE_KEY, None)
    assert pa is None or pb is None or pa == pb
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


def test_navigation_views_follow_the_actions():
    world = navigation.texture_map(0)
    size = 64
    px_per_metre = size / navigation.VIEW_METRES
    pose = (20.0, 30.0, 0.7)
    here = navigation.view(world, pose, size).astype(int)
    # W moves 0.5 m forward: the scene slides down the view by 0.5 m worth of pixels.
    ahead = navigation.view(world, poses.apply_action(pose, poses.WASD["W"]), size).astype(int)
    shift = round(0.5 * px_per_metre)
    assert np.abs(ahead[shift:] - here[:-shift]).mean() < 6 < np.abs(ahead - here).mean()
    # A quarter turn to the left turns the scene a quarter turn clockwise in the view.
    turned = navigation.view(world, (pose[0], pose[1], pose[2] + math.pi / 2), size).astype(int)
    assert np.abs(np.rot90(here, k=-1) - turned).mean() < 6
    s = navigation.navigation_sample(5, seed=0, image_size=32)
    assert s["frames"].shape == (5, 32, 32, 3) and s["num_context"] == 4
    a, b = s["poses"][-2], s["poses"][-1]
    np.testing.assert_allclose(poses.relative_action(a, b), s["action_values"], atol=1e-9)
    assert s["action"] == poses.action_text(tuple(s["action_values"]))
    if s["key"]:
        assert tuple(s["action_values"]) == poses.WASD[s["key"]]


def test_reasoning_sets_carry_their_ground_truth():
    for i in range(12):
        ood = i % 2 == 1
        m = reasoning.spatialmap(i, seed=1, image_size=64, ood=ood)
        names, rows, cols = m.truth["objects"], m.truth["rows"], m.truth["cols"]
        a, b = m.truth["query"]
        assert len(names) == (8 if ood else 7)
        assert m.answer == ("North" if rows[a] < rows[b] else "South") + ("east" if cols[a] > cols[b] else "west")
        assert {(a, b), (b, a)}.isdisjoint({tuple(e) for e in m.truth["statements"]})  # needs chaining
        assert f"Where is the {names[a]} relative to the {names[b]}?" in m.question
        assert m.solution.endswith(f"Answer: {m.answer}.") and m.image.shape == (64, 64, 3)

        g = reasoning.grid(i, seed=1, image_size=64, ood=ood)
        n = g.truth["size"]
        r, c = g.truth["start"]
        for direction, k in g.truth["program"]:
            dr, dc = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[direction]
            r, c = r + dr * k, c + dc * k
            assert 0 <= r < n and 0 <= c < n
        assert n == (4 if ood else 3) and g.answer == g.truth["objects"][r * n + c]
        assert len(g.truth["program"]) == 8 or (ood and 8 <= len(g.truth["program"]) <= 12)

        ring = reasoning.ring(i, seed=1, image_size=64, ood=ood)
        objects = ring.truth["objects"]
        steps = sum(k if d == "clockwise" else -k for d, k in ring.truth["program"])
        assert ring.answer == objects[(ring.truth["start"] + steps) % len(objects)]
        assert len(objects) == (12 if ood else 8)
        for sample in (m, g, ring):  # the image version names no positions
            assert "row" not in sample.question_direct.lower() and "clockwise, starting" not in sample.question_direct


def test_probe_sets_carry_their_ground_truth():
    relations = []
    for i in range(8):
        c = probes.counting(i, seed=0, image_size=96)
        target = tuple(c.truth["target"].split(" "))
        assert c.answer == str(sum((o["colour"], o["shape"]) == target for o in c.truth["objects"]))
        assert 0 <= int(c.answer) <= 20 and c.caption.startswith(f"a photo of {probes.NUMBER_WORDS[int(c.answer)]} ")
        d = probes.diagonal(i, seed=0, image_size=96)
        a, b = d.truth["objects"]
        horizontal = "left" if a["centre"][0] < b["centre"][0] else "right"
        vertical = "top" if a["centre"][1] < b["centre"][1] else "bottom"
        assert d.answer == f"{vertical} {horizontal}" and a["colour"] != b["colour"]
        assert math.dist(a["centre"], b["centre"]) > a["radius"] + b["radius"]
        relations.append(d.answer)
        t = probes.text_rendering(i, seed=0, image_size=128)
        assert len(t.answer) <= probes.MAX_CHARS and t.answer.endswith(".")
        background = probes.THEMES[t.truth["theme"]][0]
        assert (t.image != background).any(axis=-1).mean() > 0.02  # the text is drawn
    assert sorted(set(relations)) == sorted(probes.RELATIONS) and len(set(relations[:4])) == 4


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
    assert (info["tokens_per_frame"], info["latent_dim"]) == (16, C)
    assert info["encoder"] == {"name": "raw_pixels", "path": "", "image_size": 32, "patch": 8}
    assert info["tokenizer"]["fingerprint"] == TK.fingerprint
    samples = {name: v["samples"] for name, v in info["source_info"].items()}
    assert samples == {"text": 48, "image_text": 48, "video": 16, "action": 16}
    assert info["source_info"]["image_text"]["directions"] == ["i2t", "t2i"]
    assert len(manifest.sources["image_text"]) == 6 and len(manifest.sources["video"]) == 2
    counters: dict[str, int] = {}
    images = list(read_samples(manifest.sources["image_text"], SPEC, counters))
    assert len(images) == 48 and counters == {"samples": 48}
    expected = procedural.image_sample(5, seed=0)
    assert images[5]["caption"] == expected["caption"] and images[5]["key"] == "image-00000005"
    assert TK.decode(images[5]["tokens"]) == expected["caption"]
    assert np.array_equal(RawPixels(32, 8).decode(images[5]["latents"][0]), expected["image"])
    videos = list(read_samples(manifest.sources["video"], SPEC))
    assert videos[0]["latents"].shape == (4, 16, C) and videos[0]["kind"] == "video"
    texts = list(read_samples(manifest.sources["text"], SPEC))
    assert texts[0]["latents"] is None and TK.decode(texts[0]["tokens"]) == procedural.text_sample(0, seed=0)["text"]
    actions = list(read_samples(manifest.sources["action"], SPEC))
    truth = navigation.navigation_sample(3, seed=0, image_size=32)
    assert actions[3]["action"] == truth["action"] == TK.decode(actions[3]["tokens"])
    assert np.array_equal(RawPixels(32, 8).decode(actions[3]["latents"]), truth["frames"])
    # The stored statistics are those of every stored latent (pooled over the visual sources).
    pooled = np.concatenate([s["latents"].reshape(-1, C) for s in images + videos + actions])
    np.testing.assert_allclose(manifest.normalizer.mean, pooled.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(manifest.normalizer.std, np.maximum(pooled.std(axis=0), 1e-3), atol=1e-4)


def test_ensure_procedural_shards_is_idempotent_and_race_safe(tmp_path, shards):
    small = dict(num_images=4, num_videos=2, num_texts=4, num_actions=2, samples_per_shard=2)
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


def test_latent_width_and_tokenizer_mismatches_are_refused(shards, sentencepiece_model):
    with pytest.raises(ValueError) as err:
        load_manifest(shards, 588)
    msg = str(err.value)
    assert str(shards / "manifest.json") in msg and "192" in msg and "588" in msg
    with pytest.raises(ValueError, match="manifest.json"):
        _config(shards=str(shards), latent_dim=588).build(**BUILD)
    other = Tokenizer(Tokenizer.Config(path=str(sentencepiece_model)))
    with pytest.raises(ValueError, match="tokenised with bytes tokenizer '' .* set --tokenizer.path"):
        _config(shards=str(shards), vocab_size=1000).build(**{**BUILD, "tokenizer": other})
    with pytest.raises(ValueError, match="vocabulary is 100"):
        _config(shards=str(shards), vocab_size=100).build(**BUILD)


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def _record(key: str, kind: str, text: str = "a red circle", latents=None, **meta) -> dict:
    record = {"__key__": key, "json": {"kind": kind, **meta}, "tokens.npy": np.array(TK.encode(text), np.uint32)}
    if latents is not None:
        record["latents.npy"] = latents
    return record


def _manifest(folder: Path, sources: dict[str, list[str]], latent_dim: int | None = None) -> Path:
    stats = None
    if latent_dim:
        stats = {"count": 1, "sum": [0.0] * latent_dim, "sum_sq": [1.0] * latent_dim}
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "latent_dim": latent_dim,
                "tokens_per_frame": 16 if latent_dim else None,
                "tokenizer": TK.describe(),
                "normalization": stats,
                "sources": sources,
            }
        )
    )
    return folder


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = np.zeros((1, 16, C), np.float16)
    shard = tmp_path / "bad.tar"
    bad = {
        "wrongshape": _record("wrongshape", "image_text", latents=np.zeros((1, 16, 10), np.float16)),
        "nojson": {"__key__": "nojson", "latents.npy": good, "tokens.npy": np.array([1], np.uint32)},
        "notokens": {"__key__": "notokens", "json": {"kind": "text"}},
        "nolatents": _record("nolatents", "video"),
        "badjson": {**_record("badjson", "image_text", latents=good), "json": b"{not json"},
        "badnpy": {**_record("badnpy", "image_text"), "latents.npy": b"\x93NUMPY garbage"},
        "twoframes": _record("twoframes", "image_text", latents=np.zeros((2, 16, C), np.float16)),
        "nan": _record("nan", "video", latents=np.full((2, 16, C), np.nan, np.float16)),
        "inf": _record("inf", "video", latents=np.full((2, 16, C), np.inf, np.float16)),
        "emptycaption": _record("emptycaption", "image_text", text="", latents=good),
        "outofvocab": {**_record("outofvocab", "text"), "tokens.npy": np.array([1, 999], np.uint32)},
        "baddirections": _record("baddirections", "image_text", latents=good, directions=["sideways"]),
        "badcontext": _record("badcontext", "action", latents=np.zeros((2, 16, C), np.float16), num_context=2),
        "unknownkind": _record("unknownkind", "audio"),
    }
    _write_tar(
        shard,
        [_record("ok1", "image_text", latents=good), *bad.values(), _record("ok2", "text", "hello."),
         _record("ok3", "video", text="", latents=np.zeros((3, 16, C), np.float16))],
    )
    counters: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        keys = [s["key"] for s in read_samples([shard], SPEC, counters)]
    assert keys == ["ok1", "ok2", "ok3"]  # a video may come without a caption
    assert counters == {"samples": 3, "bad_samples": len(bad)}
    for record in caplog.records:
        assert str(shard) in record.getMessage()
    warned = " ".join(r.getMessage() for r in caplog.records)
    for key in bad:
        assert repr(key) in warned

    # A truncated shard is read up to the damage, then left; the endless cursor carries on.
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    cursor = ShardCursor("mixed", [shard, cut], stream=0, num_streams=1, seed=0, spec=SPEC)
    seen = [cursor.next()["key"] for _ in range(8)]
    assert set(seen) <= {"ok1", "ok2", "ok3"} and cursor.epoch >= 1
    assert cursor.counters["bad_samples"] > 0 and cursor.counters["read_errors"] > 0

    only_bad = tmp_path / "only_bad.tar"
    _write_tar(only_bad, [bad["nojson"]])
    with pytest.raises(RuntimeError, match="no usable sample"):
        ShardCursor("bad", [only_bad], stream=0, num_streams=1, seed=0, spec=SPEC).next()


def test_bad_data_floods_and_long_documents_in_the_loader(tmp_path, caplog):
    # 1 in 10 samples undecodable, 1 in 10 too long for a row of 64: counted per source, then
    # a clear error once the fraction exceeds the limit.
    records = []
    for i in range(400):
        if i % 10 == 3:
            records.append({"__key__": f"r{i:04d}", "json": b"{broken"})
        elif i % 10 == 7:
            records.append(_record(f"r{i:04d}", "text", "x" * 100))
        else:
            records.append(_record(f"r{i:04d}", "text", f"doc {i}"))
    _write_tar(tmp_path / "t.tar", records)
    manifest = load_manifest(_manifest(tmp_path, {"web": ["t.tar"]}), C)
    make = lambda limit: PackedMultimodalDataset(  # noqa: E731
        manifest=manifest, tokenizer=TK, seq_len=64, local_batch_size=1, source_weights={"web": 1.0},
        max_bad_fraction=limit,
    )
    tolerant = make(0.5)
    with caplog.at_level(logging.WARNING):
        _take(tolerant, 20)
    stats = tolerant.stats()
    assert stats["bad_samples/web"] > 0 and stats["too_long/web"] > 0 and stats["samples/web"] > 20
    assert stats["documents/web"] == stats["samples/web"] - stats["too_long/web"]
    assert "'r0007'" in caplog.text and "exceeds seq_len 64" in caplog.text and str(tmp_path / "t.tar") in caplog.text
    with pytest.raises(DataError, match=r"source 'web', stream 0: \d+ bad of \d+ samples .*max_bad_fraction=0.1"):
        _take(make(0.1), 400)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        make(1.0)


# ---------------------------------------------------------------- documents


def _fields(doc):
    return (
        doc.tokens.tolist(),
        doc.modality.tolist(),
        doc.frames.tolist(),
        doc.denoise.tolist(),
        doc.labels.tolist(),
    )


def _image(directions=("i2t", "t2i")) -> dict:
    lat = np.arange(4 * 3, dtype=np.float32).reshape(1, 4, 3)
    return {"kind": "image_text", "tokens": np.array(TK.encode("hi")), "latents": lat, "directions": list(directions)}


def test_sequence_formats_by_hand():
    bos, eos, boi, eoi, pad, ign = TK.bos_id, TK.eos_id, TK.boi_id, TK.eoi_id, TK.pad_id, IGNORE_INDEX
    h, i = ord("h"), ord("i")
    T, V = TEXT, VISION
    rng = np.random.default_rng(0)
    build = lambda sample, **layout: build_document(sample, TK, rng, latent_dim=3, layout=LayoutSettings(**layout))  # noqa: E731
    image = _image()

    gen = build(image, p_understanding=0.0, cond_dropout=0.0)
    assert _fields(gen) == (
        [bos, h, i, boi, pad, pad, pad, pad, eoi, eos],
        [T, T, T, T, V, V, V, V, T, T],
        [-1, -1, -1, -1, 0, 0, 0, 0, -1, -1],
        [False] * 4 + [True] * 4 + [False] * 2,
        [h, i, boi, ign, ign, ign, ign, ign, eos, ign],
    )
    assert np.array_equal(gen.latents, image["latents"][0])

    # Paper App. B: the image a caption follows is noised too (the caption conditions on it).
    und = build(image, p_understanding=1.0, cond_dropout=0.0)
    assert _fields(und) == (
        [bos, boi, pad, pad, pad, pad, eoi, h, i, eos],
        [T, T, V, V, V, V, T, T, T, T],
        [-1, -1, 0, 0, 0, 0, -1, -1, -1, -1],
        [False] * 2 + [True] * 4 + [False] * 4,
        [boi, ign, ign, ign, ign, ign, h, i, eos, ign],
    )
    clean_und = build(image, p_understanding=1.0, cond_dropout=0.0, clean_conditioning_frames=True)
    assert _fields(clean_und)[3] == [False] * 10
    # A source's allowed direction overrides p_understanding.
    assert _fields(build(_image(["i2t"]), p_understanding=0.0)) == _fields(und)
    assert _fields(build(_image(["t2i"]), p_understanding=1.0, cond_dropout=0.0)) == _fields(gen)

    uncond = build(image, p_understanding=0.0, cond_dropout=1.0)
    assert _fields(uncond)[0] == [bos, boi, pad, pad, pad, pad, eoi, eos]
    assert _fields(uncond)[4] == [boi, ign, ign, ign, ign, ign, eos, ign]

    text = build({"kind": "text", "tokens": np.array(TK.encode("hi")), "latents": None})
    assert _fields(text) == ([bos, h, i, eos], [T] * 4, [-1] * 4, [False] * 4, [h, i, eos, ign])
    assert text.latents.shape == (0, 3)

    video = {"kind": "video", "tokens": np.array(TK.encode("h")), "latents": np.ones((2, 2, 3), np.float32)}
    vid = build(video, cond_dropout=0.0)
    assert _fields(vid) == (
        [bos, h, boi, pad, pad, eoi, boi, pad, pad, eoi, eos],
        [T, T, T, V, V, T, T, V, V, T, T],
        [-1, -1, -1, 0, 0, -1, -1, 1, 1, -1, -1],
        [False] * 3 + [True] * 2 + [False] * 2 + [True] * 2 + [False] * 2,
        [h, boi, ign, ign, ign, boi, ign, ign, ign, eos, ign],
    )

    # Two context frames, the action "h", one result frame: every frame denoised (App. B).
    action = {**video, "kind": "action", "latents": np.ones((3, 2, 3), np.float32), "num_context": 2}
    act = build(action, cond_dropout=0.0)
    assert _fields(act) == (
        [bos, boi, pad, pad, eoi, boi, pad, pad, eoi, h, boi, pad, pad, eoi, eos],
        [T, T, V, V, T, T, V, V, T, T, T, V, V, T, T],
        [-1, -1, 0, 0, -1, -1, 1, 1, -1, -1, -1, 2, 2, -1, -1],
        [False] * 2 + [True] * 2 + [False] * 2 + [True] * 2 + [False] * 3 + [True] * 2 + [False] * 2,
        [boi, ign, ign, ign, boi, ign, ign, ign, h, boi, ign, ign, ign, eos, ign],
    )
    # The option: context clean, only the result denoised.
    clean = build(action, cond_dropout=0.0, clean_conditioning_frames=True)
    assert clean.denoise.tolist() == [False] * 11 + [True] * 2 + [False] * 2
    assert _fields(build(action, cond_dropout=1.0))[0] == [bos, boi, pad, pad, eoi, boi, pad, pad, eoi, boi, pad, pad, eoi, eos]


def test_direction_and_dropout_rates():
    rng = np.random.default_rng(1)
    docs = [build_document(_image(), TK, rng, latent_dim=3) for _ in range(4000)]
    # understanding: [bos] [boi] image [eoi] caption [eos]; dropped caption: [bos] [boi] image [eoi] [eos]
    understanding = sum(d.tokens[1] == TK.boi_id and len(d) == 10 for d in docs)
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
    assert packer.padding == 60 * 32 - sum(len(d) for d in packed)


def test_packer_refuses_documents_longer_than_a_row():
    # The loader's stream skips and counts them (test above); reaching the packer is a bug.
    long_doc = assemble([[TK.bos_id], (np.zeros((16, 3), np.float32), True), [TK.eos_id]], TK.pad_id, 3)
    with pytest.raises(ValueError, match="cannot fit a row of 12"):
        Packer(seq_len=12, latent_dim=3, pad_id=TK.pad_id).next_row(lambda: long_doc)
    with pytest.raises(ValueError, match="do not fit in a row of 12"):
        pack_row([long_doc], {k: v[0] for k, v in empty_rows(1, 12, 3, TK.pad_id).items()})


# ---------------------------------------------------------------- loader


def test_loader_batches_follow_the_contract(shards):
    loader = _config(shards=str(shards)).build(**BUILD, snapshot_every_n_steps=1)
    inputs, labels = next(iter(loader))
    assert set(inputs) == {*BATCH_KEYS, PROVENANCE_KEY} and len(inputs[PROVENANCE_KEY]) == 2  # rows' (shard, key)s
    assert inputs["latents"].shape == (2, 256, C) and inputs["latents"].dtype == torch.float32
    assert labels.shape == (2, 256) and inputs["denoise"].dtype == torch.bool
    for k in ("tokens", "modality", "document_ids", "frame_ids", "positions"):
        assert inputs[k].shape == (2, 256) and inputs[k].dtype == torch.int64
    stats = loader.stats()
    assert stats["rows"] == 2 and stats["bad_samples"] == 0 and stats["samples"] >= 2
    with pytest.raises(ValueError, match="latent_dim / vocab_size are unset"):
        MultimodalDataLoader.Config(shards=str(shards)).build(**BUILD)


def test_latents_are_normalised_with_the_manifest_statistics(shards):
    manifest = load_manifest(shards, C)
    raw = _dataset(shards, normalize_latents=False, source_weights={"image_text": 1.0})
    normed = _dataset(shards, source_weights={"image_text": 1.0})
    (xr, _), (xn, _) = raw.next_batch(), normed.next_batch()
    vis = xr["modality"] == VISION
    assert torch.equal(vis, xn["modality"] == VISION) and vis.any()
    expected = manifest.normalizer.normalize(xr["latents"][vis].numpy())
    np.testing.assert_allclose(xn["latents"][vis].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(manifest.normalizer.denormalize(expected), xr["latents"][vis].numpy(), atol=1e-5)


def test_source_weights_select_sources(shards):
    ds = _dataset(shards, source_weights={"text": 1.0, "video": 0.0})
    _take(ds, 2)
    assert {k for k, v in ds.stats().items() if k.startswith("documents/") and v} == {"documents/text"}
    with pytest.raises(ValueError, match="no shards for weighted sources"):
        _dataset(shards, source_weights={"text": 1.0, "audio": 1.0})


@pytest.mark.parametrize(
    "weights", [DEFAULT_SOURCE_WEIGHTS, {"text": 0.1, "video": 0.6, "image_text": 0.2, "action": 0.1}]
)
def test_mixture_hits_token_shares(shards, weights):
    # Documents differ in length by source (a video is ~5x a caption pair), so equal document
    # odds would miss the shares widely; the deficit draw holds each within 2% of positions.
    ds = _dataset(shards, source_weights=weights, local_batch_size=4, num_streams=2)
    _take(ds, 500)  # 2000 rows of 256 positions
    stats = ds.stats()
    assert stats["rows"] == 2000
    total = sum(stats[f"positions/{name}"] for name in weights)
    for name, share in weights.items():
        assert abs(stats[f"positions/{name}"] / total - share) < 0.02, (name, stats[f"positions/{name}"] / total)
    per_doc = {name: stats[f"positions/{name}"] / stats[f"documents/{name}"] for name in weights}
    assert per_doc["video"] > 2 * per_doc["image_text"]


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
    with pytest.raises(ValueError, match="num_workers=2"):
        _config(shards=str(shards), num_streams=1, num_workers=2).build(**BUILD)


def test_resume_is_exact(shards):
    cfg = _config(shards=str(shards), num_streams=2)
    build = {**BUILD, "seq_len": 1024, "local_batch_size": 4, "snapshot_every_n_steps": 1}
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


def test_two_workers_take_turns_and_resume_exactly(shards):
    # 2 streams, 2 workers: worker w builds every batch from stream w, workers alternate
    cfg = _config(shards=str(shards), num_streams=2, num_workers=2)
    build = {**BUILD, "seq_len": 1024, "local_batch_size": 2, "snapshot_every_n_steps": 1}
    loader = cfg.build(**build)
    it = iter(loader)
    reference = _dataset(shards, local_batch_size=2, num_streams=2, num_workers=2, seq_len=1024)
    first = [next(it) for _ in range(4)]
    for i, batch in enumerate(first):
        _assert_batches_equal(batch, reference.next_batch(group=i % 2))
    assert loader.stats()["rows"] == 4 * 2, "counters arrive from both workers"
    state = loader.state_dict()
    expected = [next(it) for _ in range(4)]

    resumed = cfg.build(**build)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(4), resumed)]
    for a, b in zip(expected, got):
        _assert_batches_equal(a, b)


def test_resume_is_exact_on_two_ranks(shards):
    # Two data-parallel ranks of one job (each its own loader and stream), saved and restored
    # independently, as each rank's checkpoint shard would be.
    cfg = _config(shards=str(shards), num_streams=2)
    build = {**BUILD, "dp_world_size": 2, "local_batch_size": 2, "snapshot_every_n_steps": 1}
    loaders = [cfg.build(**{**build, "dp_rank": r}) for r in (0, 1)]
    iters = [iter(loader) for loader in loaders]
    for _ in range(6):
        for it in iters:
            next(it)
    states = [loader.state_dict() for loader in loaders]
    expected = [[next(it) for _ in range(5)] for it in iters]
    for rank in (0, 1):
        resumed = cfg.build(**{**build, "dp_rank": rank})
        resumed.load_state_dict(states[rank])
        for a, b in zip(expected[rank], [b for _, b in zip(range(5), resumed)]):
            _assert_batches_equal(a, b)
        assert resumed.stats() == loaders[rank].stats()
    assert not torch.equal(expected[0][0][0]["tokens"], expected[1][0][0]["tokens"])


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
    cfg = _config(
        cache_dir=str(tmp_path), num_images=8, num_videos=4, num_texts=8, num_actions=4, samples_per_shard=4
    )
    loader = cfg.build(**{**BUILD, "local_batch_size": 1})
    inputs, _ = next(iter(loader))
    assert inputs["tokens"].shape == (1, 256)
    assert len(list(tmp_path.glob("procedural-*/manifest.json"))) == 1
