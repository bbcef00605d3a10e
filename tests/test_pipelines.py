"""Offline jobs on inputs the tests generate: tokenizer, text, image-text, video, action,
frozen encoders (tiny random models saved and loaded back), procedural sets, mixing, re-runs."""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import run_module
from unimm.data.loader import PackedMultimodalDataset
from unimm.data.sequences import LayoutSettings
from unimm.data.shards import SampleSpec, load_manifest, read_samples
from unimm.data_pipelines import navigation, poses, procedural
from unimm.data_pipelines.action import NwmSettings, annotated_job, nwm_job
from unimm.data_pipelines.encoders import EncoderSpec, load_encoder
from unimm.data_pipelines.image_text import image_text_job
from unimm.data_pipelines.images import fit_square
from unimm.data_pipelines.mix import mix_manifests
from unimm.data_pipelines.raw_pixels import RawPixels
from unimm.data_pipelines.shard_job import cli
from unimm.data_pipelines.text import text_job
from unimm.data_pipelines.train_tokenizer import main as train_tokenizer_main
from unimm.data_pipelines.video import sample_frames, video_job
from unimm.data_pipelines.write_shards import main as write_shards_main
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

BYTES = Tokenizer.Config()
RAW = EncoderSpec("raw_pixels", image_size=32, patch=8)  # 16 tokens of 192
RAW_SPEC = SampleSpec(tokens_per_frame=16, latent_dim=192, vocab_size=Tokenizer().get_vocab_size())


def _samples(folder: Path, spec: SampleSpec = RAW_SPEC) -> dict[str, list[dict]]:
    manifest = load_manifest(folder, spec.latent_dim)
    return {name: list(read_samples(shards, spec)) for name, shards in manifest.sources.items()}


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------- tokenizer


def test_trained_sentencepiece_tokenizer(sentencepiece_model):
    tok = Tokenizer(Tokenizer.Config(path=str(sentencepiece_model)))
    assert tok.special_ids == {"pad": 0, "bos": 2, "eos": 3, "boi": 4, "eoi": 5}
    assert tok.get_vocab_size() == 400 and tok.vocabulary.kind == "sentencepiece"
    text = "the red circle is above the wörld ☃."
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == text  # byte fallback
    assert len(tok.encode("the red circle")) < len("the red circle")  # merges were learnt
    assert tok.boi_id not in tok.encode("<boi> <eoi>")  # control symbols: never read from text
    assert tok.fingerprint == Tokenizer(Tokenizer.Config(path=str(sentencepiece_model))).fingerprint
    assert tok.fingerprint != Tokenizer().fingerprint


def test_hugging_face_tokenizer_json_gains_missing_specials(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([procedural.text_sample(i, seed=0)["text"] for i in range(100)], trainer)
    (tmp_path / "llama").mkdir()
    hf.save(str(tmp_path / "llama" / "tokenizer.json"))
    base = hf.get_vocab_size()
    tok = Tokenizer(Tokenizer.Config(path=str(tmp_path / "llama"), bos="<|begin_of_text|>", eos="<|end_of_text|>"))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.pad_id, tok.boi_id, tok.eoi_id) == (base, base + 1, base + 2)  # appended after the vocabulary
    assert tok.get_vocab_size() == base + 3
    ids = tok.encode("a blue star is left of ünïcode.", bos=True)
    assert tok.decode([*ids, tok.boi_id, tok.eoi_id]) == "a blue star is left of ünïcode."
    with pytest.raises(ConfigError, match="no such file"):
        Tokenizer(Tokenizer.Config(path=str(tmp_path / "missing.model")))


def test_train_tokenizer_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        for i in range(200):
            f.write(json.dumps({"body": procedural.text_sample(i, seed=2)["text"]}) + "\n")
    out = tmp_path / "tok" / "bpe.model"
    argv = ["--out", str(out), "--vocab-size", "320", "--field", "body", "--workers", "2", str(corpus)]
    assert cli(train_tokenizer_main, argv) == 0
    captured = capsys.readouterr()
    assert "vocabulary 320" in captured.out and "reading documents" in captured.err  # tqdm bar
    assert Tokenizer(Tokenizer.Config(path=str(out))).get_vocab_size() == 320
    assert cli(train_tokenizer_main, [*argv[:3], "100000", *argv[4:]]) == 2  # more pieces than the corpus has
    assert "sentencepiece training failed" in capsys.readouterr().err


# ---------------------------------------------------------------- text


def _text_inputs(folder: Path) -> list[Path]:
    docs = [procedural.text_sample(i, seed=1)["text"] for i in range(12)]
    jsonl = folder / "a.jsonl"
    jsonl.write_text(
        "\n".join([json.dumps({"text": d}) for d in docs[:5]] + ["{not json", json.dumps({"title": "no text"})])
    )
    pq.write_table(pa.table({"text": docs[5:10]}), folder / "b.parquet", row_group_size=2)
    (folder / "c.txt").write_text(docs[10] + " " + docs[11])
    return [jsonl, folder / "b.parquet", folder / "c.txt"]


def test_text_job_tokenises_every_format_and_cuts_long_documents(tmp_path, sentencepiece_model, caplog):
    inputs = _text_inputs(tmp_path)
    tokenizer = Tokenizer.Config(path=str(sentencepiece_model))
    tok = Tokenizer(tokenizer)
    with caplog.at_level(logging.WARNING):
        manifest = text_job(tmp_path / "out", "web", inputs, tokenizer=tokenizer, max_tokens=24, per_shard=3)
    info = json.loads(manifest.read_text())
    source = info["source_info"]["web"]
    assert source["kind"] == "text" and source["skipped"] == 2 and info["latent_dim"] is None
    assert "invalid JSON" in caplog.text and "no string field 'text'" in caplog.text and "a.jsonl-000000005" in caplog.text
    assert info["tokenizer"]["fingerprint"] == tok.fingerprint
    # a.jsonl: 7 records in 3 tasks, the last holding only the bad record (so no tar);
    # b.parquet: 5 rows in 2 (across row groups); c.txt: 1
    assert len(list((tmp_path / "out").glob("*.stats.json"))) == 6
    assert info["sources"]["web"] == [f"web-{i:06d}.tar" for i in (0, 1, 3, 4, 5)]
    spec = SampleSpec(tokens_per_frame=0, latent_dim=0, vocab_size=tok.get_vocab_size())
    samples = list(read_samples(load_manifest(manifest.parent, 192).sources["web"], spec))
    assert source["samples"] == len(samples) and source["tokens"]["text"] == sum(len(s["tokens"]) for s in samples)
    assert all(len(s["tokens"]) <= 24 for s in samples)
    by_doc: dict[tuple, list] = {}
    for s in samples:
        by_doc.setdefault((s["file"], s["index"]), []).append(s)
    texts = [tok.decode(np.concatenate([p["tokens"] for p in sorted(parts, key=lambda p: p.get("part", 0))]))
             for parts in by_doc.values()]
    expected = [procedural.text_sample(i, seed=1)["text"] for i in range(10)]
    assert texts[:10] == expected and texts[10].startswith(procedural.text_sample(10, seed=1)["text"])
    assert any("part" in s for s in samples)


def test_jobs_rerun_safely(tmp_path):
    inputs = _text_inputs(tmp_path)
    out = tmp_path / "out"
    text_job(out, "web", inputs, tokenizer=BYTES, per_shard=3, progress=False)
    tars = sorted(out.glob("*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in tars}
    # A job killed mid-shard: one shard never got its stats file, a temporary tar is left behind.
    (out / "web-000001.stats.json").unlink()
    (out / ".web-000001.tar.tmp-999").write_bytes(b"half a tar")
    text_job(out, "web", inputs, tokenizer=BYTES, per_shard=3, progress=False)
    assert not list(out.glob(".*.tmp-*"))
    assert {p: p.stat().st_mtime_ns for p in tars if p.name != "web-000001.tar"} == {
        p: t for p, t in stamps.items() if p.name != "web-000001.tar"
    }  # finished shards were skipped
    with pytest.raises(ConfigError, match="different settings.* refusing to overwrite"):
        text_job(out, "web", inputs, tokenizer=BYTES, per_shard=4)
    with pytest.raises(ConfigError, match="not empty and has no job.json"):
        text_job(tmp_path, "web", inputs, tokenizer=BYTES)


def test_two_workers_write_what_one_writes(tmp_path):
    inputs = _text_inputs(tmp_path)
    one = text_job(tmp_path / "one", "web", inputs, tokenizer=BYTES, per_shard=2, progress=False)
    two = text_job(tmp_path / "two", "web", inputs, tokenizer=BYTES, per_shard=2, workers=2, progress=False)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a == b
    for name in a["sources"]["web"]:
        ra, rb = (list(read_samples([p / name], RAW_SPEC)) for p in (one.parent, two.parent))
        assert [s["key"] for s in ra] == [s["key"] for s in rb]
        assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(ra, rb))


def test_job_cli_reports_errors_in_one_line(tmp_path):
    result = run_module("unimm.data_pipelines.text", "--out", str(tmp_path / "o"), "--source", "x", str(tmp_path / "none.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"input {tmp_path / 'none.jsonl'} does not exist" in result.stderr


# ---------------------------------------------------------------- image-text


def _image_inputs(folder: Path) -> list[Path]:
    pairs = folder / "pairs"
    pairs.mkdir()
    for i in range(5):
        s = procedural.image_sample(i, seed=0, image_size=48)
        (pairs / f"img{i}.png").write_bytes(_png(s["image"]))
        (pairs / f"img{i}.txt").write_text(s["caption"])
    (pairs / "broken.png").write_bytes(b"\x89PNG not really")
    (pairs / "broken.txt").write_text("a caption for nothing")
    (pairs / "nocaption.png").write_bytes(_png(procedural.image_sample(9, seed=0)["image"]))
    (pairs / "blank.png").write_bytes(_png(procedural.image_sample(8, seed=0)["image"]))
    (pairs / "blank.txt").write_text("   ")
    with wds.TarWriter(str(folder / "pairs.tar")) as sink:
        for i in range(5, 8):
            s = procedural.image_sample(i, seed=0, image_size=40)
            sink.write({"__key__": f"w{i}", "png": _png(s["image"]), "json": {"caption": s["caption"]}})
    rows = [procedural.image_sample(i, seed=0) for i in range(8, 11)]
    pq.write_table(
        pa.table({"image": [{"bytes": _png(s["image"]), "path": None} for s in rows], "caption": [s["caption"] for s in rows]}),
        folder / "rows.parquet",
    )
    return [pairs, folder / "pairs.tar", folder / "rows.parquet"]


def test_image_text_job_reads_folders_tars_and_parquet(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        manifest = image_text_job(
            tmp_path / "out", "captions", _image_inputs(tmp_path), directions=("i2t",), encoder=RAW,
            tokenizer=BYTES, per_shard=4,
        )
    info = json.loads(manifest.read_text())
    source = info["source_info"]["captions"]
    assert source["samples"] == 11 and source["skipped"] == 3 and source["directions"] == ["i2t"]
    assert "undecodable image" in caplog.text and "empty caption" in caplog.text
    assert info["encoder"]["name"] == "raw_pixels" and (info["latent_dim"], info["tokens_per_frame"]) == (192, 16)
    assert source["tokens"]["vision"] == 11 * 16
    samples = {s["key"]: s for s in _samples(manifest.parent)["captions"]}
    assert len(samples) == 11 and all(s["directions"] == ["i2t"] for s in samples.values())
    truth = procedural.image_sample(6, seed=0, image_size=40)
    got = samples["w6"]
    assert got["caption"] == truth["caption"] == Tokenizer().decode(got["tokens"])
    assert np.array_equal(RawPixels(32, 8).decode(got["latents"][0]), fit_square(truth["image"], 32))
    assert samples["img2"]["caption"] == procedural.image_sample(2, seed=0)["caption"]

    # The loader lays a captioning-only source out image-first, always; the image is noised
    # (paper App. B) unless conditioning frames are kept clean.
    for clean in (False, True):
        ds = PackedMultimodalDataset(
            manifest=load_manifest(manifest.parent, 192), tokenizer=Tokenizer(), seq_len=128, local_batch_size=1,
            source_weights={"captions": 1.0}, layout=LayoutSettings(clean_conditioning_frames=clean),
        )
        inputs, _ = ds.next_batch()
        first = inputs["document_ids"][0] == 0
        image = first & (inputs["modality"][0] == 1)
        assert inputs["tokens"][0, 1] == Tokenizer().boi_id and image.sum() == 16
        assert inputs["denoise"][0][first].sum() == (0 if clean else 16)
        assert ds.stats()["documents/captions"] > 1


# ---------------------------------------------------------------- frozen encoders


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised SigLIP / DINOv2 (with registers) / VAE, saved like real checkpoints."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    SiglipVisionModel(SiglipVisionConfig(image_size=224, **small)).save_pretrained(root / "siglip2")
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=518, num_register_tokens=4, **small)).save_pretrained(root / "dinov2")
    (root / "dinov2" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]}))
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    ).save_pretrained(root / "sd_vae")
    return {name: root / name for name in ("siglip2", "dinov2", "sd_vae")}


def test_semantic_encoders_round_trip_through_save_and_load(tiny_encoders):
    from transformers import AutoModel

    images = np.stack([procedural.image_sample(i, seed=0, image_size=224)["image"] for i in range(2)])
    for name in ("siglip2", "dinov2"):
        encoder = load_encoder(EncoderSpec(name, str(tiny_encoders[name])))
        assert (encoder.image_size, encoder.tokens_per_frame, encoder.latent_dim) == (224, 256, 32)
        latents = encoder.encode(images)
        assert latents.shape == (2, 256, 32) and latents.dtype == np.float32 and np.isfinite(latents).all()
        # The same features as the model itself gives on its normalised pixels, prefix tokens dropped.
        model = AutoModel.from_pretrained(tiny_encoders[name]).eval()
        mean, std = (0.5, 0.5) if name == "siglip2" else (0.4, 0.2)  # dinov2 reads preprocessor_config.json
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            hidden = model(pixel_values=x).last_hidden_state
        assert hidden.shape[1] == (256 if name == "siglip2" else 261)  # DINOv2: CLS + 4 registers
        np.testing.assert_allclose(latents, hidden[:, -256:].numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="needs the path"):
        EncoderSpec("webssl")


def test_vae_encoder_folds_and_decodes(tiny_encoders):
    encoder = load_encoder(EncoderSpec("sd_vae", str(tiny_encoders["sd_vae"]), image_size=64))
    assert (encoder.tokens_per_frame, encoder.latent_dim) == (16, 16)  # 8x8x4 latents -> 4x4 tokens of 16
    images = np.stack([procedural.image_sample(i, seed=0, image_size=64)["image"] for i in range(2)])
    tokens = encoder.encode(images)
    assert tokens.shape == (2, 16, 16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = encoder.vae.encode(x).latent_dist.mean  # [2, 4, 8, 8]
    torch.testing.assert_close(encoder.unfold(torch.from_numpy(tokens)), z, atol=1e-5, rtol=0)  # PixelShuffle inverts
    # token (0, 0) holds the 2x2 block of latent pixels at the top left, channel-major
    np.testing.assert_allclose(tokens[0, 0].reshape(4, 2, 2), z[0, :, :2, :2].numpy(), atol=1e-5)
    pixels = encoder.decode(tokens)
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == np.uint8


def test_image_text_job_with_a_semantic_encoder(tmp_path, tiny_encoders):
    spec = EncoderSpec("siglip2", str(tiny_encoders["siglip2"]))
    manifest = image_text_job(
        tmp_path / "out", "sstk", [_image_inputs(tmp_path)[1]], directions=("t2i",), encoder=spec, tokenizer=BYTES
    )
    info = json.loads(manifest.read_text())
    assert info["encoder"] == {"name": "siglip2", "path": str(tiny_encoders["siglip2"]), "image_size": 224, "patch": 14}
    assert (info["latent_dim"], info["tokens_per_frame"]) == (32, 256)
    stats = info["normalization"]
    assert stats["count"] == 3 * 256 and len(stats["mean"]) == 32
    loaded = load_manifest(manifest.parent, 32)
    raw = list(read_samples(loaded.sources["sstk"], SampleSpec(256, 32, 261)))
    normed = list(read_samples(loaded.sources["sstk"], SampleSpec(256, 32, 261, loaded.normalizer)))
    pooled = np.concatenate([s["latents"].reshape(-1, 32) for s in normed])
    np.testing.assert_allclose(pooled.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(pooled.std(axis=0), 1, atol=1e-2)
    np.testing.assert_allclose(loaded.normalizer.denormalize(normed[0]["latents"]), raw[0]["latents"], atol=1e-4)


# ---------------------------------------------------------------- video


def _write_video(path: Path, seconds: int, fps: int = 8, size: int = 48) -> np.ndarray:
    """A shape moving right, encoded with PyAV itself; returns the frames written."""
    import av

    frames = []
    for i in range(seconds * fps):
        centre = (8 + 30 * i / (seconds * fps), size / 2)
        frames.append(procedural.render([procedural.SceneObject("red", "square", centre, 6)], size))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return np.stack(frames)


def test_video_job_samples_one_frame_per_second_into_clips(tmp_path, caplog):
    videos = tmp_path / "videos"
    videos.mkdir()
    written = _write_video(videos / "moving.mp4", seconds=5)
    (videos / "moving.txt").write_text("a red square moving right")
    _write_video(videos / "short.mp4", seconds=1)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    times, frames = sample_frames(videos / "moving.mp4", 1.0, 48)
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert np.abs(frames.astype(int) - written[::8].astype(int)).mean() < 4  # lossy codec, same content
    with caplog.at_level(logging.WARNING):
        manifest = video_job(tmp_path / "out", "video", [videos], encoder=RAW, tokenizer=BYTES, clip_frames=2, min_clip_frames=2)
    source = json.loads(manifest.read_text())["source_info"]["video"]
    assert source["skipped"] == 1 and "broken.mp4" in caplog.text and "undecodable video" in caplog.text
    clips = {s["key"]: s for s in _samples(manifest.parent)["video"]}
    # 5 s -> frames 0..4 -> clips [0, 1], [2, 3]; the 1-frame tail and the 1 s video are too short
    assert sorted(clips) == ["moving-clip00000", "moving-clip00001"] and source["samples"] == 2
    assert clips["moving-clip00001"]["start_s"] == 2.0 and clips["moving-clip00001"]["latents"].shape == (2, 16, 192)
    assert clips["moving-clip00000"]["caption"] == "a red square moving right"


# ---------------------------------------------------------------- action


def _write_trajectories(root: Path, count: int, steps: int) -> list[np.ndarray]:
    """NWM-layout trajectory folders rendered from the procedural navigation world."""
    world = navigation.texture_map(3)
    rng = np.random.default_rng(0)
    all_poses = []
    for t in range(count):
        folder = root / f"traj{t}"
        folder.mkdir(parents=True)
        pose = (10.0 + 5 * t, 20.0, 0.3)
        trajectory = [pose]
        for _ in range(steps - 1):
            trajectory.append(poses.apply_action(trajectory[-1], poses.WASD["WASD"[int(rng.integers(4))]]))
        for i, p in enumerate(trajectory):
            Image.fromarray(navigation.view(world, p, 48)).save(folder / f"{i}.png")
        arr = np.array(trajectory)
        with open(folder / "traj_data.pkl", "wb") as f:
            pickle.dump({"position": arr[:, :2], "yaw": arr[:, 2]}, f)
        all_poses.append(arr)
    (root / "traj1" / "3.png").write_bytes(b"not a png")  # one bad frame spoils the samples using it
    return all_poses


def test_nwm_job_writes_context_action_target(tmp_path, caplog):
    trajectories = _write_trajectories(tmp_path / "nwm", count=2, steps=8)
    with caplog.at_level(logging.WARNING):
        manifest = nwm_job(tmp_path / "out", "nwm", [tmp_path / "nwm"], encoder=RAW, tokenizer=BYTES,
                           settings=NwmSettings(context=4, horizon=1))
    source = json.loads(manifest.read_text())["source_info"]["nwm"]
    # targets t + 1 for t = 3..6: 4 samples per trajectory; frame 3 of traj1 is in all of its 4
    assert source["samples"] == 4 and source["skipped"] == 4 and "traj1-000003" in caplog.text
    samples = {s["key"]: s for s in _samples(manifest.parent)["nwm"]}
    s = samples["traj0-000005"]
    assert s["frames"] == [2, 3, 4, 5, 6] and s["num_context"] == 4 and s["latents"].shape == (5, 16, 192)
    expected = poses.action_text(poses.relative_action(tuple(trajectories[0][5]), tuple(trajectories[0][6])))
    assert s["action"] == expected == Tokenizer().decode(s["tokens"])
    # a WASD step: the relative pose is the key's action
    assert any(np.allclose(s["action_values"], a) for a in poses.WASD.values())


def test_annotated_video_job(tmp_path, caplog):
    _write_video(tmp_path / "clip.mp4", seconds=6)
    (tmp_path / "actions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"video": "clip.mp4", "context": [0, 1], "result": [2, 4], "action": "the square slides right"},
        {"video": "clip.mp4", "context": [0, 5], "result": [5, 5], "action": "it keeps going"},
        {"video": "clip.mp4", "context": [1.2, 1.5], "result": [2, 3], "action": "no context frame"},
    ]))
    with caplog.at_level(logging.WARNING):
        manifest = annotated_job(tmp_path / "out", "annotated", [tmp_path / "actions.jsonl"], encoder=RAW, tokenizer=BYTES)
    samples = _samples(manifest.parent)["annotated"]
    assert [(s["num_context"], len(s["latents"])) for s in samples] == [(2, 5), (4, 5)]  # 1-4 context, 1-4 result
    assert samples[0]["frame_times"] == [0.0, 1.0, 2.0, 3.0, 4.0] and samples[1]["frame_times"][:4] == [2.0, 3.0, 4.0, 5.0]
    assert "no frame at 1.0 FPS" in caplog.text
    (tmp_path / "bad.jsonl").write_text(json.dumps({"video": "clip.mp4", "context": [0], "action": "x"}))
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected video, context"):
        annotated_job(tmp_path / "out2", "annotated", [tmp_path / "bad.jsonl"], encoder=RAW, tokenizer=BYTES)


# ---------------------------------------------------------------- procedural sets and mixing


def test_procedural_sets_in_every_view_load_as_a_mixture(tmp_path):
    counts = ["spatialmap_understanding=3", "grid_text=3", "ring_generation=3", "counting_understanding=3",
              "diagonal_generation=4", "text_rendering_understanding=2", "action=3"]
    write_shards_main(["--out", str(tmp_path), "--encoder", "raw_pixels", "--image-size", "32", "--patch", "8",
                       "--ood", *[a for c in counts for a in ("--count", c)]])
    manifest = load_manifest(tmp_path, 192)
    info = manifest.info["source_info"]
    assert {n: (v["kind"], v["directions"], v["samples"]) for n, v in info.items()} == {
        "spatialmap_understanding": ("image_text", ["i2t"], 3),
        "grid_text": ("text", [], 3),
        "ring_generation": ("image_text", ["t2i"], 3),
        "counting_understanding": ("image_text", ["i2t"], 3),
        "diagonal_generation": ("image_text", ["t2i"], 4),
        "text_rendering_understanding": ("image_text", ["i2t"], 2),
        "action": ("action", [], 3),
    }
    samples = _samples(tmp_path)
    grid = samples["grid_text"][0]
    assert grid["ood"] and grid["truth"]["size"] == 4 and Tokenizer().decode(grid["tokens"]) == f"{grid['question']}\n{grid['solution']}"
    spatial = samples["spatialmap_understanding"][1]
    assert Tokenizer().decode(spatial["tokens"]).startswith(spatial["question_direct"]) and len(spatial["truth"]["objects"]) == 8
    assert samples["diagonal_generation"][2]["caption"] == Tokenizer().decode(samples["diagonal_generation"][2]["tokens"])
    ds = PackedMultimodalDataset(
        manifest=manifest, tokenizer=Tokenizer(), seq_len=2048, local_batch_size=2,
        source_weights={name: 1.0 for name in info},
    )
    ds.next_batch()
    assert sum(v for k, v in ds.stats().items() if k.startswith("documents/")) > 2


def test_mix_checks_that_parts_agree(tmp_path, sentencepiece_model):
    inputs = _text_inputs(tmp_path)
    a = text_job(tmp_path / "a", "web", inputs, tokenizer=BYTES, progress=False).parent
    b = text_job(tmp_path / "b", "books", inputs, tokenizer=Tokenizer.Config(path=str(sentencepiece_model)), progress=False).parent
    c = image_text_job(tmp_path / "c", "pairs", _image_inputs(tmp_path)[2:], directions=("i2t", "t2i"), encoder=RAW, tokenizer=BYTES).parent
    small = EncoderSpec("raw_pixels", image_size=16, patch=4)
    d = image_text_job(tmp_path / "d", "pairs16", [tmp_path / "rows.parquet"], directions=("t2i",), encoder=small, tokenizer=BYTES).parent
    with pytest.raises(ConfigError, match="disagree on the tokenizer"):
        mix_manifests(tmp_path / "mix", [a, b])
    with pytest.raises(ConfigError, match="disagree on the encoder"):
        mix_manifests(tmp_path / "mix", [c, d])
    with pytest.raises(ConfigError, match="appears twice"):
        mix_manifests(tmp_path / "mix", [a, a])
    path = mix_manifests(tmp_path / "mix", [a, c])
    mixed = load_manifest(path.parent, 192)
    assert sorted(mixed.sources) == ["pairs", "web"] and mixed.tokens_per_frame == 16
    assert json.loads(path.read_text())["sources"]["web"][0].startswith("../a/")
    assert mixed.normalizer is not None and math.isclose(
        json.loads(path.read_text())["normalization"]["count"], 3 * 16
    )
