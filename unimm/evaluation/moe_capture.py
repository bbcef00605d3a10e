"""Routing capture of a MoE model on held-out data, for the §6.2 / App. E.8 analysis.

Forward hooks on every MoE layer's router record the routed experts of each position
(``Router.forward`` returns the top-k routed expert ids first; shared experts are fixed by
modality and left out). The capture runs four kinds of held-out documents and counts, per
layer and routed expert, how often it was picked by:

- ``text``: the text positions of procedural sentences (``[bos] text [eos]``);
- ``generation`` (T->I, noised): the image positions of ``[bos] caption [boi] z_t [eoi]`` with
  every frame at the centre of one of ``NUM_TIMESTEP_BINS`` equal timestep bins, fixed noise;
- ``understanding`` (I->T, clean): the image positions of ``[bos] [boi] image [eoi] caption``.

From these counts (``unimm.evaluation.moe_analysis``): selection rates per modality (text vs
image = generation and understanding image positions pooled), specialisation S_i and the
text / multimodal / vision classes per layer, the coefficient of variation of each expert's
image selection rate over the timestep bins, and per layer the Pearson r between the
understanding and generation selection rates. The run's ``expert_load.jsonl`` (training
loads, every token) is summarised beside them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from unimm.data.batch import TEXT, VISION
from unimm.evaluation import moe_analysis as M
from unimm.evaluation.batches import (
    attention_mask,
    document_batches,
    forward,
    generation_document,
    text_document,
    understanding_document,
)
from unimm.flow import interpolate


def routers(model) -> list:
    """Every MoE layer's router, in layer order (empty for a model without routed experts)."""
    from unimm.model.moe import MoE

    return [m.router for m in model.modules() if isinstance(m, MoE)]


@contextmanager
def routing_capture(model):
    """Yields a list of per-layer lists; each forward appends its routed ids [T, k] per layer."""
    layers = routers(model)
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        router.register_forward_hook(lambda _m, _i, output, slot=captured[i]: slot.append(output[0].detach()))
        for i, router in enumerate(layers)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class RoutingCounts:
    """counts[group] = [layers, routed experts] picks at the positions of that group, and the
    number of positions behind it."""

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = {}

    def add(self, group: str, routed_per_layer: list[torch.Tensor], select_T: torch.Tensor) -> None:
        counts = self.counts.setdefault(group, np.zeros((self.num_layers, self.num_experts), dtype=np.int64))
        for layer, experts_Tk in enumerate(routed_per_layer):
            picked = experts_Tk[select_T].reshape(-1).numpy()
            counts[layer] += np.bincount(picked, minlength=self.num_experts)
        self.tokens[group] = self.tokens.get(group, 0) + int(select_T.sum())


@torch.no_grad()
def capture(model, docs_by_group: dict[str, tuple[list, float | None]], pad_id: int, noise_seed: int = 0,
            rows: int = 16, progress=lambda items, **_: items) -> RoutingCounts:
    """Route every group's documents; ``t`` None: text positions of clean documents are counted,
    a number: frames noised to that t (fixed noise) and their image positions counted; t = 1.0:
    clean frames, image positions counted."""
    layers = routers(model)
    num_experts = layers[0].config.num_routed
    counts = RoutingCounts(len(layers), num_experts)
    latent_dim, understanding_dim = model.config.latent_dim, getattr(model.config, "understanding_dim", 0)
    prepared: dict[int, list] = {}  # the timestep bins share their documents: batch and mask them once
    with routing_capture(model) as captured:
        for group, (docs, t) in progress(docs_by_group.items(), desc="moe routing"):
            if id(docs) not in prepared:
                batches = list(document_batches(docs, pad_id, latent_dim, rows, understanding_dim))
                prepared[id(docs)] = [(batch, attention_mask(model, batch)) for batch in batches]
            for b, (batch, mask) in enumerate(prepared[id(docs)]):
                for slot in captured:
                    slot.clear()
                z0, modality, valid = batch["latents"], batch["modality"], batch["valid"]
                frames = modality == VISION
                t_BL = torch.ones(modality.shape)
                if t is not None and t < 1.0:
                    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(noise_seed * 1_000_003 + b))
                    t_BL = torch.where(frames, t, 1.0)
                    z0 = torch.where(frames[..., None], interpolate(z0, eps, t_BL[..., None]), z0)
                none = torch.zeros_like(frames)
                forward(model, batch, z0, t_BL, none, none, mask)
                select = (modality == TEXT) & valid if t is None else frames & valid
                counts.add(group, [slot[-1] for slot in captured], select.reshape(-1))
    return counts


def analyse(counts: RoutingCounts, top_k: int, num_bins: int = M.NUM_TIMESTEP_BINS):
    """(JSON report, ModalityAnalysis, timestep CV [layers, experts], r per layer) of the counts."""
    bins = [f"generation_t{b}" for b in range(num_bins)]
    generation = sum(counts.counts[g] for g in bins)
    generation_tokens = sum(counts.tokens[g] for g in bins)
    image = generation + counts.counts["understanding"]
    image_tokens = generation_tokens + counts.tokens["understanding"]
    modality = M.modality_analysis(counts.counts["text"], counts.tokens["text"], image, image_tokens, top_k)
    cv = M.timestep_cv(np.stack([counts.counts[g] for g in bins]), [counts.tokens[g] for g in bins], top_k)
    rate_u = M.selection_rates(counts.counts["understanding"], counts.tokens["understanding"], top_k)
    rate_g = M.selection_rates(generation, generation_tokens, top_k)
    r = M.layer_correlations(rate_u, rate_g)
    return {
        "tokens": dict(counts.tokens),
        "counts": {g: c for g, c in counts.counts.items()},
        "rate_text": modality.rate_text,
        "rate_image": modality.rate_image,
        "specialization": modality.specialization,
        "classes_per_layer": modality.counts,
        "class_fractions_per_layer": modality.fractions(),
        "timestep_cv": cv,
        "timestep_cv_median_per_layer": [float(np.nanmedian(row)) if np.isfinite(row).any() else None for row in cv],
        "understanding_generation_r_per_layer": r,
    }, modality, cv, r


def expert_load_summary(path: Path) -> dict | None:
    """Training loads from ``expert_load.jsonl``: per layer, each expert's share of the tokens
    summed over the logged steps, and the largest share over the mean share."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    total = np.sum([np.asarray(r["tokens_per_expert"], dtype=np.float64) for r in rows], axis=0)
    share = total / np.maximum(total.sum(-1, keepdims=True), 1.0)
    return {"steps": [rows[0]["step"], rows[-1]["step"]], "logged_steps": len(rows), "share": share,
            "max_over_mean": (share.max(-1) * share.shape[-1])}


def heldout_groups(ev, documents: int, seed: int, num_bins: int = M.NUM_TIMESTEP_BINS) -> dict[str, tuple[list, float | None]]:
    from unimm.data_pipelines import procedural

    tk, latent_dim = ev.tokenizer, ev.model_config.latent_dim
    texts = [text_document(tk.encode(procedural.text_sample(i, seed)["text"]), tk, latent_dim) for i in range(documents)]
    scenes = [procedural.image_sample(i, seed, ev.image_size) for i in range(documents)]
    captions = [tk.encode(s["caption"]) for s in scenes]
    latents = ev.latents(np.stack([s["image"] for s in scenes]))
    generation = [generation_document(c, z, tk, latent_dim) for c, z in zip(captions, latents)]
    reading = latents
    if ev.dual_encoder:  # the same scenes at the understanding encoder's size (same seed and index)
        size = ev.understanding_image_size
        reading = ev.reading_latents(np.stack([procedural.image_sample(i, seed, size)["image"] for i in range(documents)]))
    understanding = [
        understanding_document(z, c, tk, latent_dim, dual_encoder=ev.dual_encoder) for c, z in zip(captions, reading)
    ]
    groups: dict[str, tuple[list, float | None]] = {"text": (texts, None), "understanding": (understanding, 1.0)}
    for b in range(num_bins):
        groups[f"generation_t{b}"] = (generation, (b + 0.5) / num_bins)
    return groups


def run_moe(ev, out_dir: Path, *, documents: int, seed: int, progress) -> dict:
    layers = routers(ev.model)
    config = layers[0].config
    counts = capture(ev.model, heldout_groups(ev, documents, seed), ev.tokenizer.pad_id, noise_seed=seed,
                     progress=progress)
    report, modality, cv, r = analyse(counts, config.routed_top_k)
    figures = [
        M.plot_expert_classes(modality.counts, out_dir / "moe_classes.png", "routed experts by specialisation").name,
        M.plot_cv_histogram(cv, out_dir / "moe_timestep_cv.png").name,
        _plot_r(r, out_dir / "moe_understanding_generation_r.png"),
    ]
    load = expert_load_summary(ev.run / "expert_load.jsonl")
    if load is not None:
        figures.append(_plot_load(load["share"], out_dir / "moe_training_load.png"))
    return {"seed": seed, "documents": documents, "routed_experts": config.num_routed, "routed_top_k": config.routed_top_k,
            "shared": config.shared, "timestep_bins": M.NUM_TIMESTEP_BINS, **report, "training_load": load,
            "figures": figures}


def _plot_r(r: np.ndarray, path: Path) -> str:
    from unimm.evaluation.report import figure, save

    fig = figure((4.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(len(r)), r, marker="o")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("Pearson r")
    ax.set_title("understanding vs generation routing")
    return save(fig, path)


def _plot_load(share: np.ndarray, path: Path) -> str:
    from unimm.evaluation.report import figure, save

    fig = figure((max(4.0, 0.3 * share.shape[1] + 2), 0.4 * share.shape[0] + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="share of the layer's tokens")
    ax.set_yticks(range(share.shape[0]))
    ax.set_xticks(range(0, share.shape[1], max(1, share.shape[1] // 16)))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("training expert load (expert_load.jsonl)")
    return save(fig, path)
