"""Train an RAE decoder (`rae_decoder.py`) on a frozen semantic encoder's latents.

    python -m unimm.data_pipelines.train_rae_decoder --out decoders/siglip2 \\
        --encoder siglip2 --encoder-path weights/siglip2-so400m-224 --device cuda \\
        --steps 20000 --batch-size 64 --lpips weights/lpips images/ part-0000.tar

    python -m unimm.data_pipelines.train_rae_decoder --out decoders/siglip2-shapes \\
        --encoder siglip2 --encoder-path weights/siglip2-so400m-224 --procedural image --steps 2000

The encoder is frozen; every step encodes a batch of images and the decoder learns to map the
latents back to the pixels (RAE, Zheng et al., 2026, as paper §2.1 uses it). Loss: pixel L1
plus LPIPS where its weights are on disk (--lpips DIR: ``vgg16-397923af.pth``, torchvision's
ImageNet VGG16, and ``vgg.pth``, the LPIPS v0.1 linear heads of the ``lpips`` package); without
them the decoder trains on L1 alone, and the log and decoder.json say so. RAE's adversarial term
is not used. Noise augmentation as in RAE: each image's normalised latents get Gaussian noise
of a standard deviation drawn uniformly from [0, --noise-tau] (RAE's released configs: 0.8).
AdamW with RAE's betas (0.9, 0.95), linear warm-up, then a constant rate.

Images: folders (jpg, png, webp, ...; searched recursively) and webdataset tars (their image
members), resized on the short side and centre-cropped as the shard jobs do; or a procedural
generator (--procedural image|single_object|navigation). The first --eval-images images are
held out: their reconstruction error is the curve that shows the decoder learning.

--out DIR receives, at every --checkpoint-every steps and at the end (each file atomically):
    decoder.json, decoder.safetensors   the decoder: give DIR as --decoder to the data jobs or
                                        to ``load_encoder(EncoderSpec(..., decoder=DIR))``
    checkpoint.pt                       model, optimiser, step, noise RNG, loss history
    loss.json, loss.png                 training loss per step, held-out L1 at each checkpoint
    reconstructions.png                 held-out images (top) and their reconstructions (bottom)
Re-running on the same DIR continues from checkpoint.pt (a larger --steps trains further);
other settings must be the same, or the run is refused with the differences named.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from unimm.data_pipelines import navigation, procedural, semantic
from unimm.data_pipelines.encoders import EncoderSpec, load_encoder
from unimm.data_pipelines.images import IMAGE_SUFFIXES, UndecodableImage, decode_image, fit_square
from unimm.data_pipelines.rae_decoder import LatentSpace, RaeDecoder, RaeDecoderConfig, save_decoder
from unimm.data_pipelines.shard_job import cli, write_atomic, write_json
from unimm.errors import ConfigError

logger = logging.getLogger("unimm.train_rae_decoder")

CHECKPOINT_NAME = "checkpoint.pt"
_TAR_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# ---------------------------------------------------------------- images


class FileImages:
    """The images of folders and webdataset tars, by index (sorted, so an index is stable)."""

    def __init__(self, inputs: list[str]) -> None:
        self.entries: list[tuple[str, str]] = []  # (file, tar member or "")
        for raw in inputs:
            path = Path(raw).expanduser()
            if path.is_dir():
                self.entries += [(str(f), "") for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
            elif path.suffix == ".tar" and path.is_file():
                try:
                    with tarfile.open(path) as tar:
                        members = tar.getmembers()
                    names = sorted(m.name for m in members if m.isfile() and Path(m.name).suffix.lower() in _TAR_IMAGE_SUFFIXES)
                except tarfile.TarError as exc:
                    raise ConfigError(f"input {raw}: not a readable tar ({exc})") from None
                self.entries += [(str(path), n) for n in names]
            elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                self.entries.append((str(path), ""))
            else:
                raise ConfigError(f"input {raw}: expected a folder of images, a webdataset .tar or an image file")
        self._tars: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _bytes(self, index: int) -> bytes:
        file, member = self.entries[index]
        if not member:
            return Path(file).read_bytes()
        if file not in self._tars:  # kept open: a tar's member index is read once
            self._tars[file] = tarfile.open(file)
        data = self._tars[file].extractfile(member)
        return b"" if data is None else data.read()

    def image(self, index: int) -> Image.Image:
        """Image `index`; an undecodable one is logged and replaced by the next decodable one."""
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return decode_image(self._bytes(i))
            except UndecodableImage as exc:
                logger.warning("%s: skipped (%s)", ":".join(p for p in self.entries[i] if p), exc)
        raise ConfigError(f"none of the {len(self)} input images can be decoded")


PROCEDURAL: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "image": lambda i, seed, size: procedural.image_sample(i, seed, size)["image"],
    "single_object": lambda i, seed, size: procedural.single_object_sample(i, seed, size)["image"],
    # each navigation sample gives 4 context views and the target view
    "navigation": lambda i, seed, size: navigation.navigation_sample(i // 5, seed, size)["frames"][i % 5],
}


@dataclass(frozen=True)
class ImageStream:
    """Which image each training step reads: a pure function of (seed, step), so a resumed run
    reads exactly what an uninterrupted one would. Indices below `eval_images` are held out."""

    files: FileImages | None
    procedural: str
    seed: int
    eval_images: int
    encoder_size: int
    output_size: int

    def __post_init__(self) -> None:
        if self.files is not None and len(self.files) <= self.eval_images:
            raise ConfigError(
                f"{len(self.files)} input images: more than --eval-images {self.eval_images} are needed (those are held out)"
            )

    def pixels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(encoder input, reconstruction target): uint8 [S_enc, S_enc, 3], [S_out, S_out, 3]."""
        if self.files is not None:
            image = self.files.image(index)
        else:
            image = PROCEDURAL[self.procedural](index, self.seed, max(self.encoder_size, self.output_size))
        return fit_square(image, self.encoder_size), fit_square(image, self.output_size)

    def train_index(self, sample: int) -> int:
        if self.files is None:
            return self.eval_images + sample
        pool = len(self.files) - self.eval_images
        epoch, position = divmod(sample, pool)
        order = np.random.default_rng([self.seed, epoch]).permutation(pool)
        return self.eval_images + int(order[position])

    def batch(self, indices: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 encoder inputs [B, S, S, 3] and float targets [B, 3, S_out, S_out] in [-1, 1]."""
        pairs = [self.pixels(i) for i in indices]
        inputs = np.stack([p[0] for p in pairs])
        targets = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return inputs, targets


# ---------------------------------------------------------------- LPIPS

VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' input scaling layer
_SCALE = (0.458, 0.448, 0.450)


class Lpips(nn.Module):
    """LPIPS v0.1, VGG variant (Zhang et al., 2018): unit-normalise each of five VGG16 feature
    maps over channels, weight the squared differences per channel with the learned linear
    heads, average over space, sum over layers. Inputs [B, 3, H, W] in [-1, 1]; frozen."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.ReLU()]
                channels = int(v)
        self.features = nn.Sequential(*layers)  # torchvision's indices: its state dict loads as is
        for k, width in enumerate(self.widths):
            self.register_buffer(f"lin{k}", torch.ones(1, width, 1, 1))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    @property
    def widths(self) -> list[int]:
        return [self.features[t - 1].out_channels for t in _TAPS]

    @classmethod
    def load(cls, folder: str | Path) -> Lpips:
        folder = Path(folder).expanduser()
        expected = f"{VGG_FILE} (torchvision's ImageNet VGG16) and {LIN_FILE} (the lpips package's weights/v0.1/vgg.pth)"
        missing = [n for n in (VGG_FILE, LIN_FILE) if not (folder / n).is_file()]
        if missing:
            raise ConfigError(f"--lpips {folder}: no {' and no '.join(missing)}; expected a folder with {expected}")
        model = cls()
        vgg = _load_pth(folder / VGG_FILE)
        features = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
        lins = _load_pth(folder / LIN_FILE)
        heads = {f"lin{k}": lins.get(f"lin{k}.model.1.weight") for k in range(len(_TAPS))}
        try:
            model.features.load_state_dict(features)
            for name, weight in heads.items():
                if weight is None:
                    raise RuntimeError(f"no {name}.model.1.weight")
                getattr(model, name).copy_(weight.reshape(getattr(model, name).shape))
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise ConfigError(f"--lpips {folder}: the weights do not fit LPIPS-VGG ({detail}); expected {expected}") from None
        return model.eval().requires_grad_(False)

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        """Distance per image [B]."""
        h = (torch.cat([x_B3HW, y_B3HW]) - self.shift) / self.scale
        total = torch.zeros(x_B3HW.shape[0], device=x_B3HW.device)
        k = 0
        for index, layer in enumerate(self.features[: _TAPS[-1] + 1]):
            h = layer(h)
            if index in _TAPS:
                unit = h / (h.norm(dim=1, keepdim=True) + 1e-10)
                a, b = unit.chunk(2)
                total = total + ((a - b) ** 2 * getattr(self, f"lin{k}")).sum(dim=1).mean(dim=(1, 2))
                k += 1
        return total


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file that is not a state dict
        raise ConfigError(f"{path}: not a torch state dict ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, expected a state dict")
    return data


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    inputs: tuple[str, ...] = ()
    procedural: str = ""
    """Procedural generator instead of inputs: image, single_object or navigation."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 100
    noise_tau: float = 0.8
    """Noise augmentation: per-image std drawn from U[0, noise_tau] (RAE); 0 turns it off."""

    lpips: str = ""
    """Folder with the LPIPS weights (VGG_FILE, LIN_FILE); empty: pixel L1 only."""

    lpips_weight: float = 1.0
    output_size: int = 0
    """Decoder output side; 0: the encoder's input size."""

    width: int = 512
    depth: int = 8
    heads: int = 16
    eval_images: int = 8
    checkpoint_every: int = 500
    device: str = "cpu"

    def __post_init__(self) -> None:
        if bool(self.inputs) == bool(self.procedural):
            raise ConfigError("give input folders / tars, or --procedural NAME (one of the two)")
        if self.procedural and self.procedural not in PROCEDURAL:
            raise ConfigError(f"--procedural {self.procedural!r}: known: {', '.join(PROCEDURAL)}")
        for name in ("steps", "batch_size", "eval_images", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.noise_tau < 0 or self.lpips_weight < 0 or self.warmup_steps < 0:
            raise ConfigError(
                f"--lr must be > 0 and --noise-tau, --lpips-weight, --warmup-steps >= 0; got {self.lr}, "
                f"{self.noise_tau}, {self.lpips_weight}, {self.warmup_steps}"
            )

    def identity(self, encoder: EncoderSpec) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (not the length,
        the checkpoint cadence or the device)."""
        kept = {k: v for k, v in asdict(self).items() if k not in ("steps", "checkpoint_every", "device")}
        return json.loads(json.dumps({"encoder": encoder.describe(), **kept}))

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr


@dataclass
class History:
    steps: list[int]
    l1: list[float]
    lpips: list[float]
    loss: list[float]
    eval_steps: list[int]
    eval_l1: list[float]

    @classmethod
    def empty(cls) -> History:
        return cls([], [], [], [], [], [])


class _Run:
    """One training run's state: encoder, decoder, optimiser, noise RNG, held-out batch."""

    def __init__(self, out: Path, encoder_spec: EncoderSpec, settings: TrainSettings) -> None:
        if encoder_spec.name not in semantic.NAMES:
            raise ConfigError(f"--encoder {encoder_spec.name!r}: RAE decoders are for {', '.join(semantic.NAMES)}")
        self.out, self.settings, self.spec = out, settings, encoder_spec
        s = settings
        self.encoder = load_encoder(EncoderSpec(encoder_spec.name, encoder_spec.path, encoder_spec.image_size), s.device)
        self.space = LatentSpace(encoder_spec.name, self.encoder.latent_dim, self.encoder.tokens_per_frame)
        self.lpips = Lpips.load(s.lpips).to(s.device) if s.lpips else None
        files = FileImages(list(s.inputs)) if s.inputs else None
        output_size = s.output_size or self.encoder.image_size
        self.stream = ImageStream(files, s.procedural, s.seed, s.eval_images, self.encoder.image_size, output_size)
        torch.manual_seed(s.seed)  # the decoder's initial weights
        self.decoder = RaeDecoder(
            RaeDecoderConfig(self.encoder.latent_dim, self.encoder.grid, output_size, s.width, s.depth, s.heads)
        ).to(s.device)
        self.optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.noise_rng = torch.Generator().manual_seed(s.seed)
        self.step, self.history = 0, History.empty()
        eval_inputs, self.eval_targets = self.stream.batch(list(range(s.eval_images)))
        self.eval_latents = self.encode(eval_inputs)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.encoder.encode(images)).to(self.settings.device)

    def perceptual_note(self) -> str:
        if self.lpips is not None:
            return f"pixel L1 + {self.settings.lpips_weight} x LPIPS-VGG (weights from {self.settings.lpips})"
        return "pixel L1 only: no perceptual term (no --lpips folder with LPIPS weights was given)"

    @torch.no_grad()
    def eval_l1(self) -> tuple[float, torch.Tensor]:
        self.decoder.eval()
        pixels = self.decoder(self.eval_latents).cpu()
        self.decoder.train()
        return float((pixels - self.eval_targets).abs().mean()), pixels

    def train_step(self) -> None:
        s = self.settings
        indices = [self.stream.train_index(self.step * s.batch_size + j) for j in range(s.batch_size)]
        inputs, targets = self.stream.batch(indices)
        latents_BNC = self.encode(inputs)
        targets = targets.to(s.device)
        noise_BNC = None
        if s.noise_tau > 0:
            sigma_B = s.noise_tau * torch.rand(latents_BNC.shape[0], generator=self.noise_rng)
            noise_BNC = (sigma_B.view(-1, 1, 1) * torch.randn(latents_BNC.shape, generator=self.noise_rng)).to(s.device)
        pixels = self.decoder(latents_BNC, noise_BNC)
        l1 = (pixels - targets).abs().mean()
        perceptual = self.lpips(pixels, targets).mean() if self.lpips is not None else torch.zeros(())
        loss = l1 + s.lpips_weight * perceptual
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        h = self.history
        h.steps.append(self.step)
        h.l1.append(float(l1.detach()))
        h.lpips.append(float(perceptual.detach()))
        h.loss.append(float(loss.detach()))

    # -- files

    def state(self) -> dict[str, Any]:
        return {
            "identity": self.settings.identity(self.spec),
            "step": self.step,
            "decoder": self.decoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "noise_rng": self.noise_rng.get_state(),
            "history": asdict(self.history),
        }

    def restore(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say which, do not start over silently
            raise ConfigError(
                f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); delete it to start over"
            ) from None
        identity = self.settings.identity(self.spec)
        if state.get("identity") != identity:
            old = state.get("identity") or {}
            diffs = [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(identity.get(k))}"
                     for k in sorted(old.keys() | identity.keys()) if old.get(k) != identity.get(k)]
            raise ConfigError(
                f"{path} was written with other settings ({'; '.join(diffs)}): rerun with the folder's "
                "settings to continue it, or write to a new --out"
            )
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_rng.set_state(state["noise_rng"])
        self.step, self.history = int(state["step"]), History(**state["history"])

    def save(self) -> None:
        """Decoder, checkpoint, curves and pictures of the current step, each file atomically."""
        l1, pixels = self.eval_l1()
        h = self.history
        if not h.eval_steps or h.eval_steps[-1] != self.step:
            h.eval_steps.append(self.step)
            h.eval_l1.append(l1)
        s = self.settings
        training = {
            "steps": self.step,
            "losses": ["l1", "lpips"] if self.lpips is not None else ["l1"],
            "perceptual": self.perceptual_note(),
            "noise_tau": s.noise_tau,
            "encoder": self.spec.describe(),
            "images": list(s.inputs) or f"procedural {s.procedural} (seed {s.seed})",
            "held_out_l1": l1,
        }
        save_decoder(self.out, self.decoder, self.space, training)
        buffer = io.BytesIO()
        torch.save(self.state(), buffer)
        write_atomic(self.out / CHECKPOINT_NAME, buffer.getvalue())
        write_json(self.out / "loss.json", {**asdict(h), "perceptual": training["perceptual"]})
        _plot_losses(h, self.out / "loss.png", training["perceptual"])
        _save_grid(self.stream, pixels, self.out / "reconstructions.png")


def _save_grid(stream: ImageStream, pixels: torch.Tensor, path: Path) -> None:
    """Held-out originals (top row) over their reconstructions (bottom row), 2-px white gaps."""
    originals = [stream.pixels(i)[1] for i in range(pixels.shape[0])]
    rebuilt = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    size, gap = originals[0].shape[0], 2
    grid = np.full((2 * size + 3 * gap, len(originals) * (size + gap) + gap, 3), 255, np.uint8)
    for col, (a, b) in enumerate(zip(originals, rebuilt)):
        x = gap + col * (size + gap)
        grid[gap : gap + size, x : x + size] = a
        grid[2 * gap + size : 2 * gap + 2 * size, x : x + size] = b
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _plot_losses(h: History, path: Path, perceptual: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(h.steps, h.l1, label="train L1 (noised latents)", alpha=0.7)
    if any(h.lpips):
        ax.plot(h.steps, h.lpips, label="train LPIPS", alpha=0.7)
    ax.plot(h.eval_steps, h.eval_l1, "o-", label="held-out L1 (clean latents)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(perceptual, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def train_rae_decoder(out: str | Path, encoder: EncoderSpec, settings: TrainSettings, *, progress: bool = True) -> History:
    """Train (or continue training) the decoder in `out` up to `settings.steps`; returns the losses."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, encoder, settings)
    checkpoint = out / CHECKPOINT_NAME
    if checkpoint.is_file():
        run.restore(checkpoint)
        logger.info("%s: continuing from step %d", checkpoint, run.step)
    logger.info("decoder: %s; loss: %s", run.decoder.config, run.perceptual_note())
    if run.step == 0:
        run.history.eval_steps.append(0)
        run.history.eval_l1.append(run.eval_l1()[0])
    bar = tqdm(
        total=settings.steps, initial=min(run.step, settings.steps), desc=f"RAE decoder -> {out}", unit="step",
        disable=not progress,
    )
    while run.step < settings.steps:
        run.train_step()
        bar.update()
        bar.set_postfix(l1=f"{run.history.l1[-1]:.4f}")
        if run.step % settings.checkpoint_every == 0 and run.step < settings.steps:
            run.save()
    bar.close()
    run.save()
    h = run.history
    logger.info("held-out L1 %.4f at step 0 -> %.4f at step %d; files in %s", h.eval_l1[0], h.eval_l1[-1], run.step, out)
    return h


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="image folders and webdataset .tar files")
    parser.add_argument("--out", required=True, type=Path, help="decoder folder (resumed when it holds a checkpoint)")
    parser.add_argument("--encoder", required=True, choices=semantic.NAMES)
    parser.add_argument("--encoder-path", required=True, help="local weights folder (save_pretrained layout)")
    parser.add_argument("--image-size", type=int, default=0, help="encoder input size; 0: its default (224)")
    parser.add_argument("--procedural", default="", choices=("", *PROCEDURAL), help="procedural images instead of inputs")
    d = TrainSettings(procedural="image")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--noise-tau", type=float, default=d.noise_tau, help="latent noise augmentation (RAE); 0: off")
    parser.add_argument("--lpips", default="", metavar="DIR", help=f"folder with {VGG_FILE} and {LIN_FILE}; empty: L1 only")
    parser.add_argument("--lpips-weight", type=float, default=d.lpips_weight)
    parser.add_argument("--output-size", type=int, default=0, help="decoded image side; 0: the encoder's input size")
    parser.add_argument("--width", type=int, default=d.width, help="decoder transformer width")
    parser.add_argument("--depth", type=int, default=d.depth, help="decoder blocks")
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--eval-images", type=int, default=d.eval_images, help="held-out images (curve and picture)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--device", default="cpu", help="encoder and decoder device (cuda, cuda:1, ...)")
    args = parser.parse_args(argv)
    settings = TrainSettings(
        inputs=tuple(args.inputs), procedural=args.procedural, seed=args.seed, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, noise_tau=args.noise_tau,
        lpips=args.lpips, lpips_weight=args.lpips_weight, output_size=args.output_size, width=args.width,
        depth=args.depth, heads=args.heads, eval_images=args.eval_images, checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    train_rae_decoder(args.out, EncoderSpec(args.encoder, args.encoder_path, args.image_size), settings)


if __name__ == "__main__":
    raise SystemExit(cli(main))
