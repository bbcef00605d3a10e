"""Dual encoder (paper §6.3's baseline, as in Janus and Bagel): understanding latents from one
encoder, generation latents from another, each with its own input projection.

Raw-pixel encoders at two sizes stand in for SigLIP 2 and SD-VAE, so nothing needs weights.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import losses, train_recipe
from unimm.data.batch import IGNORE_INDEX, TEXT, VISION
from unimm.data.loader import PackedMultimodalDataset
from unimm.data.packer import Packer
from unimm.data.sequences import LayoutSettings, build_document
from unimm.data.shards import SampleSpec, decode_sample, load_manifest, read_samples
from unimm.data.tar_records import Record, read_records
from unimm.data_pipelines import image_text
from unimm.data_pipelines.images import fit_square
from unimm.data_pipelines.mix import mix_manifests
from unimm.data_pipelines.raw_pixels import RawPixels
from unimm.data_pipelines.text import text_job
from unimm.errors import ConfigError
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.params import count_params, meta_model
from unimm.model.transformer import UnimmModel
from unimm.tokenizer import Tokenizer

TK = Tokenizer()
# generation: 32 px in 8x8 patches (16 tokens, 192 wide); understanding: 24 px in 4x4 patches
# (36 tokens, 48 wide): unequal token counts and input sizes on purpose (the recipe's counts are equal)
UND = RawPixels(24, 4)


def _images(folder, n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    originals = []
    for i in range(n):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not square: both crops are fitted
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption number {i}")
        originals.append(pixels)
    return originals


@pytest.fixture(scope="module")
def dual_shards(tmp_path_factory):
    """An image-text folder written with both encoders through the job's command line."""
    root = tmp_path_factory.mktemp("dual")
    originals = _images(root / "pairs")
    argv = [
        "--out", str(root / "pairs_out"), "--source", "pairs", "--directions", "i2t,t2i", "--per-shard", "3",
        "--encoder", "raw_pixels", "--image-size", "32", "--patch", "8",
        "--understanding-encoder", "raw_pixels", "--understanding-image-size", "24", "--understanding-patch", "4",
        str(root / "pairs"),
    ]
    assert image_text.cli(image_text.main, argv) == 0
    return root, originals


def test_job_writes_both_latents_and_the_manifest_records_both_encoders(dual_shards, tmp_path):
    root, originals = dual_shards
    folder = root / "pairs_out"
    manifest = json.loads((folder / "manifest.json").read_text())
    # the generation encoder stays the manifest's encoder (single-encoder readers see it unchanged)
    assert manifest["encoder"]["patch"] == 8 and (manifest["latent_dim"], manifest["tokens_per_frame"]) == (192, 16)
    und = manifest["understanding"]
    assert und["encoder"] == {"name": "raw_pixels", "path": "", "image_size": 24, "patch": 4}
    assert (und["latent_dim"], und["tokens_per_frame"]) == (48, 36)
    assert und["normalization"]["count"] == 5 * 36 and len(und["normalization"]["std"]) == 48
    assert manifest["normalization"]["count"] == 5 * 16
    assert manifest["source_info"]["pairs"]["understanding_encoder"] == "raw_pixels"
    # a frame is laid out with either encoder's tokens: lengths count the longer
    lengths = manifest["source_info"]["pairs"]["document_lengths"]
    assert lengths["longest"] == 2 + len("caption number 0") + 36 + 2

    records = [r for tar in sorted(folder.glob("*.tar")) for r in read_records(tar) if isinstance(r, Record)]
    assert len(records) == 5
    by_key = {r.key: r for r in records}
    for i, pixels in enumerate(originals):
        parts = by_key[f"img{i}"].parts
        gen = np.load(io.BytesIO(parts["latents.npy"]))
        und_latents = np.load(io.BytesIO(parts["understanding_latents.npy"]))
        assert gen.shape == (1, 16, 192) and und_latents.shape == (1, 36, 48)
        # each encoder's input is fitted from the original image, not from the other's crop
        expected = UND.encode(fit_square(pixels, 24)[None]).astype(np.float16)
        np.testing.assert_array_equal(und_latents, expected)

    # a re-run with another understanding encoder is refused, naming it
    argv = ["--out", str(folder), "--source", "pairs", "--patch", "8", "--image-size", "32", "--per-shard", "3",
            "--understanding-encoder", "raw_pixels", "--understanding-patch", "8", "--understanding-image-size", "32",
            str(root / "pairs")]
    with pytest.raises(ConfigError, match="understanding_encoder"):
        image_text.main(argv)

    # mixed with a text source, the mixture keeps the understanding entry and its statistics
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    text_job(tmp_path / "web", "web", [tmp_path / "corpus.jsonl"], tokenizer=Tokenizer.Config(), progress=False)
    mixed = json.loads(mix_manifests(tmp_path, [tmp_path / "web", folder]).read_text())
    assert mixed["understanding"] == und
    assert "understanding_encoder" not in mixed["source_info"]["web"]


def test_reader_hands_out_understanding_latents_with_their_own_statistics(dual_shards):
    root, _ = dual_shards
    manifest = load_manifest(root / "pairs_out", 192)
    u = manifest.understanding
    assert (u.latent_dim, u.tokens_per_frame, u.sources) == (48, 36, ("pairs",))
    single = SampleSpec(16, 192, TK.get_vocab_size(), manifest.normalizer)
    dual = SampleSpec(16, 192, TK.get_vocab_size(), manifest.normalizer,
                      understanding=SampleSpec(36, 48, TK.get_vocab_size(), u.normalizer))
    plain = list(read_samples(manifest.sources["pairs"], single))
    assert len(plain) == 5 and all("understanding_latents" not in s for s in plain)
    samples = list(read_samples(manifest.sources["pairs"], dual))
    und = np.concatenate([s["understanding_latents"].reshape(-1, 48) for s in samples])
    assert und.shape == (5 * 36, 48)
    np.testing.assert_allclose(und.mean(0), 0, atol=1e-3)  # normalised with the understanding statistics
    np.testing.assert_allclose(und.std(0), 1, atol=1e-3)
    # a dual-encoder reader counts an image-text sample without them as bad
    record = next(r for r in read_records(manifest.sources["pairs"][0]) if isinstance(r, Record))
    parts = {k: v for k, v in record.parts.items() if k != "understanding_latents.npy"}
    sample, reason = decode_sample({**parts, "__key__": record.key, "__url__": "x.tar"}, dual)
    assert sample is None and reason == "missing understanding_latents.npy"

    # a dual-encoder model needs them: the loader refuses single-encoder shards and a wrong width
    args = dict(tokenizer=TK, seq_len=128, local_batch_size=1, source_weights={"pairs": 1.0})
    with pytest.raises(ConfigError, match="expects 40"):
        PackedMultimodalDataset(manifest=manifest, understanding_dim=40, **args)
    lone = json.loads((root / "pairs_out" / "manifest.json").read_text())
    del lone["understanding"]
    (root / "single").mkdir(exist_ok=True)
    (root / "single" / "manifest.json").write_text(json.dumps(lone))
    for name in manifest.sources["pairs"]:
        target = root / "single" / name.name
        if not target.exists():
            target.symlink_to(name)
    with pytest.raises(ConfigError, match="hold one encoder's latents"):
        PackedMultimodalDataset(manifest=load_manifest(root / "single", 192), understanding_dim=48, **args)
    # and packs the understanding latents into batches
    dataset = PackedMultimodalDataset(manifest=manifest, understanding_dim=48, **args)
    fields, _ = dataset.next_batch()
    assert fields["understanding_latents"].shape == (1, 128, 48)


def _sample(directions):
    rng = np.random.default_rng(1)
    return {
        "kind": "image_text",
        "directions": directions,
        "tokens": np.array([70, 71, 72]),
        "latents": rng.normal(size=(1, 4, 3)).astype(np.float32),  # generation: 4 tokens, 3 wide
        "understanding_latents": rng.normal(size=(1, 6, 2)).astype(np.float32),  # understanding: 6 tokens, 2 wide
    }


def test_loader_feeds_understanding_frames_and_generated_frames_each_their_latents():
    rng = np.random.default_rng(0)
    i2t, t2i = _sample(["i2t"]), _sample(["t2i"])
    # the paper's default noises every frame; a dual encoder's understanding frames stay clean anyway
    layout = LayoutSettings(cond_dropout=0.0, clean_conditioning_frames=False)
    read = build_document(i2t, TK, rng, latent_dim=3, layout=layout)
    made = build_document(t2i, TK, rng, latent_dim=3, layout=layout)
    # <bos> <boi> 6 understanding patches <eoi> caption <eos>
    assert len(read) == 1 + 1 + 6 + 1 + 3 + 1 and read.understanding.sum() == 6
    assert (read.modality[read.understanding] == VISION).all() and not read.denoise.any()
    np.testing.assert_array_equal(read.understanding_latents, i2t["understanding_latents"][0])
    assert read.latents.shape == (0, 3)
    # <bos> caption <boi> 4 generation patches <eoi> <eos>, noised
    assert len(made) == 1 + 3 + 1 + 4 + 1 + 1 and made.understanding is None
    assert made.denoise.sum() == 4
    np.testing.assert_array_equal(made.latents, t2i["latents"][0])
    # captions are still trained after the understanding image
    assert list(read.labels[read.labels != IGNORE_INDEX]) == [TK.boi_id, 70, 71, 72, TK.eos_id]

    packer = Packer(seq_len=30, latent_dim=3, pad_id=TK.pad_id, understanding_dim=2)
    docs = iter([made, read, read, made])
    row = packer.next_row(lambda: next(docs))
    assert len(packer.row_sources) == 2  # 11 + 13 positions fit, the third document does not
    und, vis = row["understanding"], row["modality"] == VISION
    assert und.sum() == 6 and (und <= vis).all() and not (row["denoise"] & und).any()
    np.testing.assert_array_equal(row["understanding_latents"][und], i2t["understanding_latents"][0])
    assert not row["understanding_latents"][~und].any()
    np.testing.assert_array_equal(row["latents"][row["denoise"]], t2i["latents"][0])
    assert not row["latents"][und].any()  # the generation latents hold nothing at understanding frames
    assert (row["frame_ids"][und] != row["frame_ids"][row["denoise"]][0]).all()

    # without understanding latents (a single-encoder model) the i2t image is a generation frame again
    plain = {k: v for k, v in i2t.items() if k != "understanding_latents"}
    doc = build_document(plain, TK, rng, latent_dim=3, layout=layout)
    assert doc.understanding is None and doc.denoise.sum() == 4
    # a carried-over understanding document survives a checkpoint of the packer
    state = packer.state_dict()
    restored = Packer(seq_len=30, latent_dim=3, pad_id=TK.pad_id, understanding_dim=2)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.carry.understanding, read.understanding)
    np.testing.assert_array_equal(restored.carry.understanding_latents, read.understanding_latents)


def _tiny_model() -> UnimmModel:
    torch.manual_seed(0)
    config = UnimmModel.Config(
        vocab_size=32, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn=FFNConfig(kind="modality", hidden_dim=64),
        max_seq_len=32, latent_dim=6, understanding_dim=4, time_freq_dim=16, attn_backend="sdpa",
    )
    model = config.build()
    model.init_weights()
    return model


def _batch(understanding_frame: bool):
    """<bos> x x <boi> 4 patches <eoi> x x: the frame read (understanding) or generated."""
    modality = torch.tensor([[TEXT] * 4 + [VISION] * 4 + [TEXT] * 3])
    visual = modality == VISION
    frames = torch.where(visual, 0, -1)
    understanding = visual & understanding_frame
    g = torch.Generator().manual_seed(0)
    return dict(
        tokens=torch.randint(0, 32, (1, 11), generator=g),
        latents=torch.randn(1, 11, 6, generator=g) * (visual & ~understanding)[..., None],
        t=torch.where(visual & ~understanding, 0.3, 1.0),
        modality=modality,
        positions=torch.arange(11)[None],
        mask=build_attention_mask(torch.zeros(1, 11, dtype=torch.long), frames, "sdpa"),
        lm=~visual,
        flow=visual & ~understanding,
        understanding=understanding,
        understanding_latents=torch.randn(1, 11, 4, generator=g) * understanding[..., None],
    )


def _grads(model, b):
    model.zero_grad()
    logits, flow, _ = model(
        b["tokens"], b["latents"], b["t"], b["modality"], b["positions"], b["mask"], b["lm"], b["flow"],
        understanding=b["understanding"], understanding_latents=b["understanding_latents"],
    )
    (logits.square().sum() + flow.square().sum()).backward()
    return model.latent_proj.weight.grad.abs().sum(), model.understanding_proj.weight.grad.abs().sum()


def test_model_reads_understanding_frames_only_through_understanding_proj():
    model = _tiny_model()
    latent, understanding = _grads(model, _batch(understanding_frame=False))
    assert latent > 0 and understanding == 0  # no understanding frame: understanding_proj untouched
    latent, understanding = _grads(model, _batch(understanding_frame=True))
    assert latent == 0 and understanding > 0  # only an understanding frame: latent_proj untouched

    # an understanding frame carries no flow time: t there changes nothing
    b = _batch(understanding_frame=True)
    with torch.no_grad():
        h1 = model.embed(b["tokens"], b["latents"], b["t"], b["modality"], b["understanding"], b["understanding_latents"])
        h2 = model.embed(b["tokens"], b["latents"], b["t"] * 0.1, b["modality"], b["understanding"], b["understanding_latents"])
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)

    # a single-encoder model refuses understanding latents
    single = UnimmModel.Config(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, latent_dim=6,
                               max_seq_len=32, ffn=FFNConfig(hidden_dim=64)).build()
    with pytest.raises(ConfigError, match="understanding_dim 0"):
        single.embed(b["tokens"], b["latents"], b["t"], b["modality"], b["understanding"], b["understanding_latents"])


def test_sampler_captions_from_understanding_latents_as_training_reads_them():
    from types import SimpleNamespace

    from unimm.flow import FlowMatchingConfig
    from unimm.sampling import MixedModalSampler, SamplingConfig

    model = _tiny_model().eval()
    tk = SimpleNamespace(pad_id=0, bos_id=1, boi_id=2, eoi_id=3, eos_id=4)  # ids inside the tiny vocabulary
    frame = torch.randn(5, 4)  # 5 understanding tokens, 4 wide (generation frames have 4 tokens)
    sampler = MixedModalSampler(model, tk, FlowMatchingConfig(), 1.0, 4, SamplingConfig())
    ctx = sampler.new_context()
    sampler.feed_text(ctx, [tk.bos_id, tk.boi_id])
    sampler.feed_frame(ctx, frame, understanding=True)
    cached = sampler.feed_text(ctx, [tk.eoi_id])
    # the same sequence in one forward pass, as the trainer runs it
    modality = torch.tensor([[TEXT, TEXT] + [VISION] * 5 + [TEXT]])
    und = modality == VISION
    und_latents = torch.zeros(1, 8, 4)
    und_latents[und] = frame
    last = torch.zeros(1, 8, dtype=torch.bool)
    last[0, 7] = True
    logits, _, _ = model(
        torch.tensor([[1, 2, 0, 0, 0, 0, 0, 3]]), torch.zeros(1, 8, 6), torch.ones(1, 8), modality,
        torch.arange(8)[None], build_attention_mask(torch.zeros(1, 8, dtype=torch.long), torch.where(und, 0, -1), "sdpa"),
        last, torch.zeros(1, 8, dtype=torch.bool), understanding=und, understanding_latents=und_latents,
    )
    torch.testing.assert_close(cached, logits[0], rtol=1e-4, atol=1e-5)
    # and the caption depends on what the understanding frame shows
    other = sampler.new_context()
    sampler.feed_text(other, [tk.bos_id, tk.boi_id])
    sampler.feed_frame(other, -frame, understanding=True)
    assert not torch.allclose(sampler.feed_text(other, [tk.eoi_id]), cached)


def test_parameter_count_lists_the_second_projection_among_the_adapters():
    from unimm.titan.model_spec import FLAVORS

    dual = count_params(meta_model(FLAVORS["debug_dual_encoder"]()))
    single = count_params(meta_model(FLAVORS["debug_modality"]()))
    assert (dual.total, dual.active) == (single.total, single.active)
    assert dual.adapter == single.adapter + 48 * 128 + 128
    paper = count_params(meta_model(FLAVORS["dual_encoder_2b3"]()))
    mfn = count_params(meta_model(FLAVORS["modality_ffn_2b3"]()))
    assert (paper.total, paper.active) == (mfn.total, mfn.active)  # 2.30B / 1.50B: adapters apart
    # SD-VAE (16 wide) in and out, SigLIP 2 (1152 wide) in
    time_mlp = 256 * 256 + 256 + 256 * 2048 + 2048
    assert paper.adapter == (16 * 2048 + 2048) + time_mlp + (2048 * 16 + 16) + (1152 * 2048 + 2048)


def _adam_first_moments(checkpoint, names) -> dict[str, torch.Tensor]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    keys = [f"optimizer.state.{name}.exp_avg" for name in names]
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


@pytest.mark.slow
def test_debug_cpu_dual_encoder_trains_and_exports_to_hf(tmp_path, data_cache):
    from unimm.cli import main

    out = tmp_path / "run"
    train_recipe("debug_cpu_dual_encoder", out, data_cache, "--checkpoint.interval", "2", steps=2)
    lm, flow = losses(out, "loss_lm"), losses(out, "loss_flow")
    assert sorted(lm) == [1, 2] and all(math.isfinite(v) and v > 0 for v in [*lm.values(), *flow.values()])
    assert (out / "checkpoint" / "step-2").is_dir()
    # understanding frames reached understanding_proj through the trainer: Adam's first moments moved
    moments = _adam_first_moments(out / "checkpoint" / "step-2", ("understanding_proj.weight", "latent_proj.weight"))
    assert all(m.abs().sum() > 0 for m in moments.values())
    # the trained checkpoint exports with its understanding_proj (tests/test_dual_encoder_export.py
    # checks the exported model against the native one)
    hf = tmp_path / "hf"
    assert main(["convert", "to-hf", "--ckpt", str(out / "checkpoint" / "step-2"), "--out", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["understanding_dim"] == 48
