"""A dual-encoder model through `unimm convert`: to-hf --format unimm carries the second input
projection (``understanding_proj``) into the remote-code model, and from-hf brings it back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_start
from unimm.cli import main
from unimm.convert.dcp_io import DcpCheckpoint
from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.masks import build_attention_mask
from unimm.titan.model_spec import FLAVORS

FLAVOR = "debug_dual_encoder"
# row 0: text(0-3) understanding frame 0 (4-7) caption(8-10) | doc 1: text(11-12) generated frame 1 (13-15)
# row 1: the same positions, both frames generated
MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
POSITIONS = list(range(11)) + list(range(5))
L = len(MODALITY)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return make_start(tmp_path_factory.mktemp("dual_export"), FLAVOR)


def rows(*values: list[int]) -> torch.Tensor:
    return torch.tensor([list(v) for v in values])


def mixed_batch(config):
    g = torch.Generator().manual_seed(1)
    modality = rows(MODALITY, MODALITY)
    understanding = torch.zeros(2, L, dtype=torch.bool)
    understanding[0, 4:8] = True
    generated = (modality == VISION) & ~understanding
    return dict(
        tokens=torch.randint(0, config.vocab_size, (2, L), generator=g),
        # the loader leaves the generation latents empty and t = 1 at understanding frames
        latents=torch.randn(2, L, config.latent_dim, generator=g) * generated[..., None],
        t=torch.where(generated, torch.rand(2, L, generator=g), 1.0),
        modality=modality,
        understanding=understanding,
        understanding_latents=torch.randn(2, L, config.understanding_dim, generator=g) * understanding[..., None],
        documents=rows(DOCS, DOCS),
        frames=rows(FRAMES, FRAMES),
        positions=rows(POSITIONS, POSITIONS),
    )


def native_outputs(model, b):
    everywhere = torch.ones(b["tokens"].shape, dtype=torch.bool)
    mask = build_attention_mask(b["documents"], b["frames"], "sdpa")
    logits, flow, _ = model(
        b["tokens"], b["latents"], b["t"], b["modality"], b["positions"], mask, everywhere, everywhere,
        understanding=b["understanding"], understanding_latents=b["understanding_latents"],
    )
    return logits.view(2, L, -1), flow.view(2, L, -1)


def exported_outputs(model, b, **changes):
    b = b | changes
    return model.forward_flow(
        input_ids=b["tokens"], latents=b["latents"], timesteps=b["t"], modality=b["modality"],
        attention_mask=model.hybrid_attention_mask(b["documents"], b["frames"]), position_ids=b["positions"],
        understanding_latents=b["understanding_latents"], understanding=b["understanding"],
    )


@torch.no_grad()
def test_exported_dual_encoder_matches_native(start):
    config = FLAVORS[FLAVOR]()
    assert json.loads((start.hf / "config.json").read_text())["understanding_dim"] == config.understanding_dim == 48
    native = config.build().eval()
    native.load_state_dict(start.weights)
    exported = AutoModelForCausalLM.from_pretrained(start.hf, trust_remote_code=True).eval()
    assert exported.model.understanding_proj.weight.shape == (config.dim, config.understanding_dim)

    b = mixed_batch(config)
    logits, flow = native_outputs(native, b)
    out = exported_outputs(exported, b)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.flow, flow, rtol=1e-5, atol=1e-5)
    caption = (slice(0, 1), slice(8, 11))  # text after the understanding frame, in the same document
    assert flow[b["modality"] == VISION].abs().mean() > 1e-2

    # understanding positions carry no flow time and no generation latent: neither changes anything
    ignored = exported_outputs(exported, b, t=torch.where(b["understanding"], 0.1, b["t"]),
                               latents=b["latents"] + 5.0 * b["understanding"][..., None])
    torch.testing.assert_close(ignored.logits, out.logits, rtol=0, atol=0)

    # the understanding projection matters: without it the caption's logits change
    weight, bias = exported.model.understanding_proj.weight, exported.model.understanding_proj.bias
    saved = weight.clone(), bias.clone()
    weight.zero_(), bias.zero_()
    zeroed = exported_outputs(exported, b)
    weight.copy_(saved[0]), bias.copy_(saved[1])
    assert (zeroed.logits[caption] - out.logits[caption]).abs().max() > 1e-3
    torch.testing.assert_close(zeroed.logits[1], out.logits[1], rtol=0, atol=0)  # row 1 has no understanding frame

    # as a single-encoder row (no understanding mask) the export still runs, as the native model does
    plain = exported.forward_flow(
        input_ids=b["tokens"], latents=b["latents"], timesteps=b["t"], modality=b["modality"],
        attention_mask=exported.hybrid_attention_mask(b["documents"], b["frames"]), position_ids=b["positions"],
    )
    torch.testing.assert_close(plain.logits[1], out.logits[1], rtol=0, atol=0)


def test_dual_encoder_round_trip_is_bit_exact(start, tmp_path, capsys):
    assert main(["convert", "from-hf", "--hf", str(start.hf), "--out", str(tmp_path / "back")]) == 0
    back = DcpCheckpoint(tmp_path / "back" / "checkpoint" / "step-0").load()
    assert back.keys() == start.weights.keys() and "understanding_proj.weight" in back
    for name, tensor in start.weights.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    card = (start.hf / "README.md").read_text()
    assert "understanding_proj" in card and "| understanding latent width (dual encoder) | 48 |" in card

    # --format llama refuses it as before (a modality FFN), writing nothing
    capsys.readouterr()
    llama = tmp_path / "llama"
    assert main(["convert", "to-hf", "--ckpt", str(start.dcp), "--out", str(llama), "--format", "llama"]) == 2
    assert "shared (dense) FFN" in capsys.readouterr().err and not llama.exists()
