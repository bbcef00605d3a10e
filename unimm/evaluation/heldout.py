"""Held-out losses: text perplexity and the flow loss at fixed timesteps with fixed noise.

Two held-out sets, kept apart so each modality is measured on its own:

- text: ``[bos] text [eos]`` documents; the next-token cross-entropy over every text target
  (``<eos>`` included), in nats per token, and its exponential, the perplexity;
- image: ``[bos] caption [boi] frame [eoi] [eos]`` (every image generated from its caption,
  so all its patches carry the flow loss); the flow-matching loss (per latent element, the
  training's ``flow_loss_sum`` divided by the element count) at the fixed flow times
  t_k = (k + 1/2) / K, k < K (t = 1 clean), with Gaussian noise drawn from fixed seeds. Fixed t
  and noise take the timestep sampling out of a comparison between checkpoints or runs.

Either set is a procedural split generated here from its own seed (never the training
split's: ``procedural_seed`` differs), or a shard folder (``manifest.json``) written with
the run's tokenizer and, for images, its encoder. Latents are normalised with the *training*
manifest's statistics, as the model saw them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unimm.data.batch import IGNORE_INDEX
from unimm.data.sequences import Document
from unimm.errors import ConfigError
from unimm.evaluation.batches import attention_mask, document_batches, forward, generation_document, text_document
from unimm.flow import FlowMatchingConfig, flow_loss_sum, interpolate


@dataclass(frozen=True)
class HeldOutSpec:
    seed: int = 1
    """Procedural seed of the generated split; refused when it is the training split's."""
    text_dir: str = ""
    """A shard folder holding the held-out text (kind ``text``); empty: generated."""
    image_dir: str = ""
    """A shard folder holding held-out image-text pairs (kind ``image_text``); empty: generated."""
    documents: int = 64
    """Documents in each held-out set (the first ones of a folder)."""
    timesteps: int = 8
    noise_seed: int = 0
    rows: int = 16
    """Documents per forward pass."""

    def __post_init__(self) -> None:
        if self.documents < 1 or self.timesteps < 1 or self.rows < 1:
            raise ConfigError(
                f"held-out documents, timesteps and rows must be >= 1, got {self.documents}, {self.timesteps}, {self.rows}"
            )


@dataclass(frozen=True)
class DataContext:
    """What a held-out set needs from the run: its tokenizer, how images become the model's
    latents, the training data's settings."""

    tokenizer: object
    latents: Callable[[np.ndarray], np.ndarray]  # uint8 [B, S, S, 3] -> normalised [B, N, C]
    image_size: int
    latent_dim: int
    seq_len: int
    train_seed: int
    train_manifest: object  # unimm.data.shards.Manifest of the training data


def _shard_samples(folder: str, kind: str, ctx: DataContext, count: int) -> list[dict]:
    from unimm.data.shards import SampleSpec, load_manifest, read_samples

    manifest = load_manifest(folder, ctx.latent_dim)
    info, train_info = manifest.info, ctx.train_manifest.info
    fingerprint = (info.get("tokenizer") or {}).get("fingerprint")
    if fingerprint != ctx.tokenizer.fingerprint:
        raise ConfigError(
            f"{manifest.path}: written with tokenizer {fingerprint}, the run's is {ctx.tokenizer.fingerprint}"
        )
    if kind == "image_text" and info.get("encoder") != train_info.get("encoder"):
        raise ConfigError(
            f"{manifest.path}: encoder {info.get('encoder')} differs from the run's {train_info.get('encoder')}"
        )
    sources = [name for name, s in (info.get("source_info") or {}).items() if (s or {}).get("kind") == kind]
    if not sources:
        raise ConfigError(f"{manifest.path}: no source of kind {kind!r} (sources: {', '.join(manifest.sources)})")
    spec = SampleSpec(
        manifest.tokens_per_frame or ctx.train_manifest.tokens_per_frame,
        ctx.latent_dim,
        ctx.tokenizer.get_vocab_size(),
        ctx.train_manifest.normalizer,
    )
    samples: list[dict] = []
    for name in sources:
        for sample in read_samples(manifest.sources[name], spec):
            samples.append(sample)
            if len(samples) == count:
                return samples
    return samples


def _check_seed(spec: HeldOutSpec, ctx: DataContext) -> None:
    if spec.seed == ctx.train_seed:
        raise ConfigError(f"held-out seed {spec.seed} is the training split's procedural_seed: pass another")


def text_documents(spec: HeldOutSpec, ctx: DataContext) -> list[Document]:
    from unimm.data_pipelines import procedural

    tk = ctx.tokenizer
    if spec.text_dir:
        ids = [s["tokens"].tolist() for s in _shard_samples(spec.text_dir, "text", ctx, spec.documents)]
    else:
        _check_seed(spec, ctx)
        ids = [tk.encode(procedural.text_sample(i, spec.seed)["text"]) for i in range(spec.documents)]
    docs = [text_document(i, tk, ctx.latent_dim) for i in ids]
    return _fitting(docs, ctx.seq_len, "text")


def image_documents(spec: HeldOutSpec, ctx: DataContext) -> list[Document]:
    from unimm.data_pipelines import procedural

    tk = ctx.tokenizer
    if spec.image_dir:
        pairs = [(s["tokens"].tolist(), s["latents"][0]) for s in _shard_samples(spec.image_dir, "image_text", ctx, spec.documents)]
    else:
        _check_seed(spec, ctx)
        samples = [procedural.image_sample(i, spec.seed, ctx.image_size) for i in range(spec.documents)]
        latents = ctx.latents(np.stack([s["image"] for s in samples]))
        pairs = [(tk.encode(s["caption"]), z) for s, z in zip(samples, latents)]
    docs = [generation_document(ids, z, tk, ctx.latent_dim) for ids, z in pairs]
    return _fitting(docs, ctx.seq_len, "image")


def _fitting(docs: list[Document], seq_len: int, what: str) -> list[Document]:
    kept = [d for d in docs if len(d) <= seq_len]
    if not kept:
        raise ConfigError(f"no held-out {what} document fits the run's seq_len {seq_len}")
    return kept


@torch.no_grad()
def perplexity(model, docs: list[Document], pad_id: int, rows: int = 16) -> dict:
    """Mean next-token cross-entropy (nats) over every text target of ``docs``, and exp of it."""
    total, count = 0.0, 0
    for batch in document_batches(docs, pad_id, model.config.latent_dim, rows):
        labels = batch["labels"]
        targets = labels != IGNORE_INDEX
        logits, _ = forward(model, batch, batch["latents"], torch.ones(labels.shape), targets, torch.zeros_like(targets))
        total += F.cross_entropy(logits.float(), labels[targets], reduction="sum").item()
        count += int(targets.sum())
    nll = total / count if count else math.nan
    return {"nll": nll, "perplexity": math.exp(nll) if math.isfinite(nll) else math.nan,
            "tokens": count, "documents": len(docs)}


def fixed_timesteps(k: int) -> list[float]:
    return [(i + 0.5) / k for i in range(k)]


@torch.no_grad()
def diffusion_loss(
    model, docs: list[Document], flow: FlowMatchingConfig, pad_id: int, timesteps: int = 8, noise_seed: int = 0,
    rows: int = 16,
) -> dict:
    """Flow loss per latent element at each fixed t (same noise at every t) and their mean."""
    batches = list(document_batches(docs, pad_id, model.config.latent_dim, rows))
    masks = [attention_mask(model, batch) for batch in batches]
    noise = []
    for b, batch in enumerate(batches):
        generator = torch.Generator().manual_seed(noise_seed * 1_000_003 + b)
        noise.append(torch.randn(batch["latents"].shape, generator=generator))
    ts, per_t = fixed_timesteps(timesteps), []
    for t in ts:
        total, count = 0.0, 0
        for batch, mask, eps in zip(batches, masks, noise, strict=True):
            denoise, z0 = batch["denoise"], batch["latents"].float()
            t_BL = torch.where(denoise, t, 1.0)
            z_in = torch.where(denoise[..., None], interpolate(z0, eps, t_BL[..., None]), z0)
            _, pred = forward(model, batch, z_in, t_BL, torch.zeros_like(denoise), denoise, mask)
            total += flow_loss_sum(pred, z0[denoise], eps[denoise], t_BL[denoise][:, None], flow).item()
            count += int(denoise.sum()) * z0.shape[-1]
        per_t.append(total / count if count else math.nan)
    return {"t": ts, "loss_per_t": per_t, "mean": sum(per_t) / len(per_t), "documents": len(docs),
            "noise_seed": noise_seed}


def data_context(config, manifest, tokenizer, latents: Callable[[np.ndarray], np.ndarray], image_size: int) -> DataContext:
    return DataContext(
        tokenizer=tokenizer,
        latents=latents,
        image_size=image_size,
        latent_dim=config.model_spec.model.latent_dim,
        seq_len=config.training.seq_len,
        train_seed=config.dataloader.procedural_seed,
        train_manifest=manifest,
    )
