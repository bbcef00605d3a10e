"""Expert-specialisation analysis of a MoE model's routing counts (paper §6.2, App. E.8).

Inputs are routing counts: ``counts[layer, expert]`` = how many times the router put expert
``expert`` of layer ``layer`` in a token's top-k set, recorded separately per modality / task /
timestep bin, together with the number of tokens N behind each array and k.

* selection rate  R_m(i) = C_m(i) / (N_m * k)   (probability that expert i serves a token of m);
* specialisation  S_i = (R_text - R_image) / (R_text + R_image) in [-1, 1]; an expert no token of
  either modality picked has R_text + R_image = 0 and S_i = NaN: it is *unused*, excluded from
  the three classes and counted apart;
* classes         text if S_i > 0.5, vision if S_i < -0.5, multimodal otherwise (boundaries are
  multimodal);
* timestep CV     std / mean over the timestep bins (10 in the paper) of each expert's image
  selection rate, population std (ddof=0); an expert never selected in any bin has mean 0 and
  CV = NaN (excluded from histograms and summaries);
* understanding vs generation: per layer, Pearson r over experts between the selection rates on
  image-to-text (understanding) and text-to-image (generation) tokens; NaN for a layer where
  either side is constant over the experts (r is undefined).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT, MULTIMODAL, VISION, UNUSED = "text", "multimodal", "vision", "unused"
CLASS_NAMES = (TEXT, MULTIMODAL, VISION)
THRESHOLD = 0.5
NUM_TIMESTEP_BINS = 10


def _counts(counts) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim == 1:
        c = c[None]  # one layer
    if np.any(c < 0):
        raise ValueError("routing counts must be non-negative")
    return c


def selection_rates(counts, num_tokens, top_k: int) -> np.ndarray:
    """R = C / (N * k) for counts [..., layers, experts]; ``num_tokens`` a scalar or broadcastable
    against the leading axes (e.g. one N per timestep bin: shape [bins, 1, 1])."""
    c = _counts(counts)
    n = np.asarray(num_tokens, dtype=np.float64)
    if top_k <= 0 or np.any(n <= 0):
        raise ValueError("num_tokens and top_k must be positive")
    return c / (n * top_k)


def specialization(rate_text, rate_image) -> np.ndarray:
    """S = (R_text - R_image) / (R_text + R_image); NaN where both rates are 0 (unused expert)."""
    rt, ri = np.asarray(rate_text, dtype=np.float64), np.asarray(rate_image, dtype=np.float64)
    total = rt + ri
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (rt - ri) / np.where(total > 0, total, 1.0), np.nan)


def classify(scores, threshold: float = THRESHOLD) -> np.ndarray:
    """Class name of each expert: text (S > t), vision (S < -t), multimodal, or unused (NaN)."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.full(s.shape, MULTIMODAL, dtype=object)
    out[s > threshold] = TEXT
    out[s < -threshold] = VISION
    out[np.isnan(s)] = UNUSED
    return out


def class_counts(scores, threshold: float = THRESHOLD) -> dict[str, np.ndarray]:
    """Per layer: {text, multimodal, vision, unused} -> int array [layers] (the stacked bars)."""
    labels = classify(np.atleast_2d(scores), threshold)
    return {name: (labels == name).sum(axis=-1).astype(int) for name in (*CLASS_NAMES, UNUSED)}


def timestep_bin(t, num_bins: int = NUM_TIMESTEP_BINS) -> np.ndarray:
    """Bin index of flow timesteps t in [0, 1]: equal-width bins, t = 1 in the last bin."""
    t = np.asarray(t, dtype=np.float64)
    return np.clip((t * num_bins).astype(int), 0, num_bins - 1)


def coefficient_of_variation(rates, axis: int = 0) -> np.ndarray:
    """std / mean along ``axis`` (population std); NaN where the mean is 0."""
    r = np.asarray(rates, dtype=np.float64)
    mean = r.mean(axis=axis)
    std = r.std(axis=axis)  # ddof=0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.nan)


def timestep_cv(counts_by_bin, tokens_by_bin, top_k: int) -> np.ndarray:
    """CV over timestep bins of each expert's selection rate.

    ``counts_by_bin``: [bins, layers, experts] (or [bins, experts]); ``tokens_by_bin``: image
    tokens routed in each bin, [bins]. Rates are normalised per bin, so bins with more tokens do
    not look like specialisation. Returns [layers, experts].
    """
    c = np.asarray(counts_by_bin, dtype=np.float64)
    if c.ndim == 2:
        c = c[:, None, :]
    if c.ndim != 3:
        raise ValueError(f"counts_by_bin must be [bins, layers, experts], got shape {c.shape}")
    n = np.asarray(tokens_by_bin, dtype=np.float64).reshape(-1, 1, 1)
    if n.shape[0] != c.shape[0]:
        raise ValueError(f"{n.shape[0]} token totals for {c.shape[0]} bins")
    return coefficient_of_variation(selection_rates(c, n, top_k), axis=0)


def pearson_r(x, y) -> float:
    """Pearson correlation of two 1-D arrays; NaN when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("pearson_r takes two 1-D arrays of equal length")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else float("nan")


def layer_correlations(rates_a, rates_b) -> np.ndarray:
    """Per layer Pearson r over experts between two [layers, experts] rate arrays."""
    a, b = np.atleast_2d(rates_a), np.atleast_2d(rates_b)
    if a.shape != b.shape:
        raise ValueError(f"rate arrays differ in shape: {a.shape} vs {b.shape}")
    return np.array([pearson_r(a[l], b[l]) for l in range(a.shape[0])])


@dataclass(frozen=True)
class ModalityAnalysis:
    rate_text: np.ndarray  # [layers, experts]
    rate_image: np.ndarray
    specialization: np.ndarray  # NaN = unused
    classes: np.ndarray  # object [layers, experts] of class names
    counts: dict[str, np.ndarray]  # class -> [layers]

    def fractions(self) -> dict[str, np.ndarray]:
        """Per layer share of each class among the *used* experts (unused excluded)."""
        used = sum(self.counts[c] for c in CLASS_NAMES).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {c: np.where(used > 0, self.counts[c] / np.where(used > 0, used, 1), np.nan) for c in CLASS_NAMES}


def modality_analysis(
    counts_text, tokens_text: int, counts_image, tokens_image: int, top_k: int, threshold: float = THRESHOLD
) -> ModalityAnalysis:
    rt = selection_rates(counts_text, tokens_text, top_k)
    ri = selection_rates(counts_image, tokens_image, top_k)
    s = specialization(rt, ri)
    return ModalityAnalysis(rt, ri, s, classify(s, threshold), class_counts(s, threshold))


# --------------------------------------------------------------------------- figures


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # Agg, independent of pyplot's global backend
    return fig


def plot_expert_classes(counts: dict[str, np.ndarray], out_png: str | os.PathLike, title: str = "") -> Path:
    """Stacked bars, one per layer, of text / multimodal / vision experts (Figure 18)."""
    fig = _figure((max(4.0, 0.35 * len(counts[TEXT]) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    layers = np.arange(len(counts[TEXT]))
    bottom = np.zeros(len(layers))
    for name, colour in zip(CLASS_NAMES, ("tab:blue", "tab:purple", "tab:orange")):
        values = np.asarray(counts[name], dtype=np.float64)
        ax.bar(layers, values, bottom=bottom, label=name, color=colour)
        bottom += values
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    ax.set_title(title or "expert specialisation by layer")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110, format="png")
    return out_png


def plot_cv_histogram(cv, out_png: str | os.PathLike, bins: int = 30, title: str = "") -> Path:
    """Histogram of the timestep CVs of all used experts (NaN excluded; Figure 19)."""
    values = np.asarray(cv, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    fig = _figure((5.0, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(values, bins=bins, color="tab:orange")
    if len(values):
        ax.axvline(float(np.median(values)), color="k", linestyle="--", label=f"median {np.median(values):.3f}")
        ax.legend(fontsize="small")
    ax.set_xlabel("coefficient of variation over timestep bins")
    ax.set_ylabel("experts")
    ax.set_title(title or f"timestep specialisation ({len(values)} experts)")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110, format="png")
    return out_png
