"""The RAE decoder (data_pipelines/rae_decoder.py) and its training job (train_rae_decoder.py) on
tiny random SigLIP / DINOv2 encoders saved and loaded through the real transformers path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from unimm.data_pipelines import procedural
from unimm.data_pipelines.encoders import EncoderSpec, load_encoder
from unimm.data_pipelines.rae_decoder import LatentSpace, RaeDecoder, RaeDecoderConfig, load_decoder, sincos_positions
from unimm.data_pipelines.train_rae_decoder import (
    LIN_FILE,
    VGG_FILE,
    FileImages,
    ImageStream,
    Lpips,
    TrainSettings,
    main,
    train_rae_decoder,
)
from unimm.errors import ConfigError

SIZE = 28  # 2 x 2 patches of 14: 4 tokens a frame
TINY = dict(width=32, depth=1, heads=2, eval_images=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation (and on a busy machine
    OpenMP's spinning costs several times the work itself)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    small = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    SiglipVisionModel(SiglipVisionConfig(image_size=224, hidden_size=32, **small)).save_pretrained(root / "siglip2")
    SiglipVisionModel(SiglipVisionConfig(image_size=224, hidden_size=48, **small)).save_pretrained(root / "siglip2_wide")
    Dinov2Model(Dinov2Config(image_size=224, hidden_size=32, **small)).save_pretrained(root / "dinov2")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def trained(weights, tmp_path_factory) -> tuple[Path, object]:
    """A decoder trained for 40 steps on procedural single shapes (with noise augmentation)."""
    out = tmp_path_factory.mktemp("decoder")
    settings = TrainSettings(procedural="single_object", steps=40, batch_size=8, lr=3e-3, warmup_steps=0, **TINY)
    history = train_rae_decoder(out, EncoderSpec("siglip2", str(weights["siglip2"]), SIZE), settings, progress=False)
    return out, history


def test_training_lowers_the_reconstruction_error_and_writes_its_files(trained):
    out, history = trained
    assert history.eval_steps == [0, 40] and len(history.l1) == 40
    # held-out images, clean latents: the decoder learnt the shapes' pixels, not just noise
    assert history.eval_l1[-1] < 0.6 * history.eval_l1[0], history.eval_l1
    assert np.mean(history.l1[-5:]) < 0.6 * np.mean(history.l1[:5])
    info = json.loads((out / "decoder.json").read_text())
    assert info["latent_space"] == {"encoder": "siglip2", "latent_dim": 32, "tokens_per_frame": 4}
    assert info["architecture"]["image_size"] == SIZE and info["architecture"]["grid"] == 2
    assert info["training"]["losses"] == ["l1"] and "no perceptual term" in info["training"]["perceptual"]
    assert info["training"]["steps"] == 40
    curve = json.loads((out / "loss.json").read_text())
    assert curve["eval_l1"] == pytest.approx(history.eval_l1) and "no perceptual term" in curve["perceptual"]
    grid = np.asarray(Image.open(out / "reconstructions.png"))
    assert grid.shape == (2 * SIZE + 6, 4 * (SIZE + 2) + 2, 3)  # 4 held-out images over their reconstructions
    assert Image.open(out / "loss.png").size[0] > 0


def test_a_saved_decoder_loads_and_decodes_as_the_trained_one(trained, weights):
    out, _ = trained
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    config = RaeDecoderConfig(**json.loads((out / "decoder.json").read_text())["architecture"])
    reference = RaeDecoder(config).eval()
    reference.load_state_dict(state["decoder"])
    spec = EncoderSpec("siglip2", str(weights["siglip2"]), SIZE, decoder=str(out))
    # the manifest records the decoder, and the sampler rebuilds the encoder from that record
    assert spec.describe()["decoder"] == str(out)
    encoder = load_encoder(EncoderSpec(**spec.describe()))
    images = np.stack([procedural.single_object_sample(i, seed=1, image_size=SIZE)["image"] for i in range(3)])
    latents = encoder.encode(images)
    with torch.no_grad():
        expected = reference(torch.from_numpy(latents))
    loaded = load_decoder(out, LatentSpace("siglip2", 32, 4))
    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(latents)), expected)
    pixels = encoder.decode(latents)
    assert pixels.shape == (3, SIZE, SIZE, 3) and pixels.dtype == np.uint8
    by_hand = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, by_hand)
    np.testing.assert_array_equal(encoder.decode(latents[None])[0], pixels)  # leading dims kept
    # without a decoder a semantic encoder has no decode: the sampler then shows no pixels
    assert getattr(load_encoder(EncoderSpec("siglip2", str(weights["siglip2"]), SIZE)), "decode", None) is None
    assert "decoder" not in EncoderSpec("siglip2", str(weights["siglip2"])).describe()


def test_resume_continues_exactly_where_the_run_stopped(weights, tmp_path):
    spec = EncoderSpec("siglip2", str(weights["siglip2"]), SIZE)
    common = dict(procedural="image", batch_size=2, lr=1e-3, warmup_steps=4, noise_tau=0.5, checkpoint_every=3, **TINY)
    straight = train_rae_decoder(tmp_path / "a", spec, TrainSettings(steps=6, **common), progress=False)
    train_rae_decoder(tmp_path / "b", spec, TrainSettings(steps=3, **common), progress=False)
    resumed = train_rae_decoder(tmp_path / "b", spec, TrainSettings(steps=6, **common), progress=False)
    assert resumed.l1 == straight.l1 and resumed.eval_l1 == straight.eval_l1  # bit for bit
    a, b = load_file(tmp_path / "a" / "decoder.safetensors"), load_file(tmp_path / "b" / "decoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.001 -> 0.002\)"):
        train_rae_decoder(tmp_path / "b", spec, TrainSettings(steps=8, **{**common, "lr": 2e-3}), progress=False)


def test_a_decoder_for_other_latents_is_refused(trained, weights, tmp_path):
    out, _ = trained
    where = str(out / "decoder.json")
    with pytest.raises(ConfigError, match=rf"{where} was trained for encoder 'siglip2'.*asked to decode encoder 'dinov2'"):
        load_encoder(EncoderSpec("dinov2", str(weights["dinov2"]), SIZE, decoder=str(out)))
    with pytest.raises(ConfigError, match=rf"{where} .*32 wide, 4 tokens.*48 wide, 4 tokens"):
        load_encoder(EncoderSpec("siglip2", str(weights["siglip2_wide"]), SIZE, decoder=str(out)))
    with pytest.raises(ConfigError, match=r"4 tokens a frame.*16 tokens a frame"):
        load_encoder(EncoderSpec("siglip2", str(weights["siglip2"]), 2 * SIZE, decoder=str(out)))
    with pytest.raises(ConfigError, match="for the semantic encoders"):
        EncoderSpec("raw_pixels", decoder=str(out))
    with pytest.raises(ConfigError, match="no decoder.safetensors"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "decoder.json").write_text("{}")
        load_encoder(EncoderSpec("siglip2", str(weights["siglip2"]), SIZE, decoder=str(tmp_path / "half")))


def test_decoder_geometry():
    pos = sincos_positions(4, 8)
    assert pos.shape == (16, 8)
    # row half and column half: tokens of one row share the row channels, and at the origin sin 0, cos 1
    torch.testing.assert_close(pos[1, :4], pos[0, :4])
    torch.testing.assert_close(pos[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    decoder = RaeDecoder(RaeDecoderConfig(latent_dim=6, grid=2, image_size=4, width=8, depth=1, heads=2))
    with torch.no_grad():
        decoder.to_pixels.weight.zero_()
        decoder.to_pixels.bias.copy_(torch.arange(12.0))  # patch 2 x 2 x RGB, same for every token
        pixels = decoder(torch.randn(1, 4, 6))
    # pixel (y, x) of every patch holds bias entries (y * 2 + x) * 3 + channel
    assert pixels.shape == (1, 3, 4, 4)
    assert pixels[0, :, 0, 0].tolist() == [0, 1, 2] and pixels[0, :, 1, 3].tolist() == [9, 10, 11]
    assert pixels[0, 2, 2, 2].item() == 2


def _reference_lpips(model: Lpips, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Zhang et al. (2018) eq. 1 written out layer by layer: d = sum_l mean_hw || w_l * (f0 - f1) ||^2
    of channel-unit-normalised VGG16 activations relu1_2 ... relu5_3."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    blocks = [2, 2, 3, 3, 3]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h0, h1, total, c = (x - shift) / scale, (y - shift) / scale, 0.0, 0
    for level, n in enumerate(blocks):
        if level:
            h0, h1 = F.max_pool2d(h0, 2), F.max_pool2d(h1, 2)
        for _ in range(n):
            h0, h1 = F.relu(convs[c](h0)), F.relu(convs[c](h1))
            c += 1
        u0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        u1 = h1 / (h1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = getattr(model, f"lin{level}").view(1, -1, 1, 1)
        total = total + (w * (u0 - u1) ** 2).sum(1).mean((1, 2))
    return total


def test_lpips_term_loads_local_weights_and_trains(weights, tmp_path):
    torch.manual_seed(0)
    vgg = Lpips()
    folder = tmp_path / "lpips"
    folder.mkdir()
    # the files as torchvision and the lpips package ship them
    torch.save({**{f"features.{k}": v for k, v in vgg.features.state_dict().items()}, "classifier.0.bias": torch.zeros(3)},
               folder / VGG_FILE)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1) for k, w in enumerate(vgg.widths)}, folder / LIN_FILE)
    model = Lpips.load(folder)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        d = model(x, y)
        torch.testing.assert_close(d, _reference_lpips(model, x, y), rtol=1e-4, atol=1e-6)
        assert (d > 0).all() and torch.equal(model(x, x), torch.zeros(2))
    spec = EncoderSpec("siglip2", str(weights["siglip2"]), SIZE)
    settings = TrainSettings(procedural="image", steps=1, batch_size=2, warmup_steps=0, lpips=str(folder), **TINY)
    history = train_rae_decoder(tmp_path / "out", spec, settings, progress=False)
    info = json.loads((tmp_path / "out" / "decoder.json").read_text())
    assert info["training"]["losses"] == ["l1", "lpips"] and history.lpips[0] > 0
    assert history.loss[0] == pytest.approx(history.l1[0] + history.lpips[0])
    (folder / LIN_FILE).unlink()
    with pytest.raises(ConfigError, match=rf"--lpips {folder}: no {LIN_FILE}"):
        Lpips.load(folder)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(procedural.image_sample(seed, seed=0, image_size=20)["image"]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_inputs_folders_tars_and_a_fixed_order(tmp_path):
    (tmp_path / "pics").mkdir()
    for i in range(3):
        (tmp_path / "pics" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "pics" / "3.png").write_bytes(b"not a png")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i in (10, 11):
            info = tarfile.TarInfo(f"key{i}.png")
            info.size = len(_png(i))
            tar.addfile(info, io.BytesIO(_png(i)))
    files = FileImages([str(tmp_path / "pics"), str(tmp_path / "shard.tar")])
    assert len(files) == 6
    np.testing.assert_array_equal(np.asarray(files.image(4)), np.asarray(Image.open(io.BytesIO(_png(10)))))
    np.testing.assert_array_equal(np.asarray(files.image(3)), np.asarray(files.image(4)))  # undecodable: the next one
    stream = ImageStream(files, "", seed=0, eval_images=2, encoder_size=14, output_size=28)
    epoch = sorted(stream.train_index(s) for s in range(4))
    assert epoch == [2, 3, 4, 5]  # each training image once an epoch, held-out ones never
    inputs, targets = stream.batch([0, 1])
    assert inputs.shape == (2, 14, 14, 3) and targets.shape == (2, 3, 28, 28)
    with pytest.raises(ConfigError, match="more than --eval-images 6"):
        ImageStream(files, "", seed=0, eval_images=6, encoder_size=14, output_size=14)
    with pytest.raises(ConfigError, match="expected a folder of images"):
        FileImages([str(tmp_path / "missing")])


def test_cli_refuses_bad_settings(weights, tmp_path, capsys):
    from unimm.data_pipelines.shard_job import cli

    base = ["--out", str(tmp_path / "o"), "--encoder", "siglip2", "--encoder-path", str(weights["siglip2"])]
    assert cli(main, base) == 2
    assert "give input folders / tars, or --procedural NAME" in capsys.readouterr().err
    assert cli(main, [*base, "--procedural", "image", "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err


def test_a_decoder_does_not_change_which_latents_a_folder_holds(tmp_path):
    """A decoder only reads latents: a job's identity ignores it, and folders that differ only
    by it mix (keeping the decoder); another encoder path still disagrees."""
    from unimm.data_pipelines.mix import _agree

    plain = EncoderSpec("siglip2", "/weights/siglip", 112)
    decoded = EncoderSpec("siglip2", "/weights/siglip", 112, decoder="/decoders/siglip")
    assert plain.latent_identity() == decoded.latent_identity()
    assert decoded.describe()["decoder"] == "/decoders/siglip"
    parts = [(tmp_path / "a", {"encoder": plain.describe()}), (tmp_path / "b", {"encoder": decoded.describe()})]
    assert _agree(parts, "encoder", "encoder") == decoded.describe()
    other = EncoderSpec("siglip2", "/weights/other", 112)
    with pytest.raises(ConfigError, match="disagree on the encoder"):
        _agree([*parts, (tmp_path / "c", {"encoder": other.describe()})], "encoder", "encoder")
