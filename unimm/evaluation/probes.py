"""Layer-wise linear probes of the backbone's hidden states (paper App. D.1).

Held-out procedural images are read as in understanding (``[bos] [boi] image [eoi] [eos]``,
clean); at every depth (0: the input embeddings, l: after block l) the hidden states of the
frame's positions are mean-pooled into one feature vector per image. A linear probe per depth
and label predicts a procedural label from it:

- ``colour`` and ``shape`` of single-object images (8 classes each);
- ``count``: the number of objects (1-3) of ``procedural.image_sample`` scenes.

The probe is a ridge-regression classifier (one-hot targets, closed form, argmax), fitted on
the first ``TRAIN_FRACTION`` of the images, features standardised with the training part's
statistics, and scored on the rest. Chance is the test split's majority-class share.
"""

from __future__ import annotations

import numpy as np
import torch

from unimm.data.batch import VISION
from unimm.evaluation.batches import document_batches, forward, layer_outputs, understanding_document

TRAIN_FRACTION = 0.75
RIDGE = 1.0


def fit_ridge_classifier(x_NF: np.ndarray, y_N: np.ndarray, num_classes: int, ridge: float = RIDGE):
    """(mean, std, weights [F + 1, K]) of a ridge classifier on standardised features."""
    mean, std = x_NF.mean(0), x_NF.std(0) + 1e-6
    z = np.concatenate([(x_NF - mean) / std, np.ones((len(x_NF), 1))], axis=1)
    targets = np.eye(num_classes)[y_N]
    reg = ridge * np.eye(z.shape[1])
    reg[-1, -1] = 0.0  # the bias is not shrunk
    weights = np.linalg.solve(z.T @ z + reg, z.T @ targets)
    return mean, std, weights


def predict(model, x_NF: np.ndarray) -> np.ndarray:
    mean, std, weights = model
    z = np.concatenate([(x_NF - mean) / std, np.ones((len(x_NF), 1))], axis=1)
    return (z @ weights).argmax(1)


def probe_accuracy(x_NF: np.ndarray, y_N: np.ndarray, num_classes: int, train_fraction: float = TRAIN_FRACTION) -> dict:
    """Test accuracy of a probe fitted on the first ``train_fraction`` of the rows, and chance."""
    split = int(round(train_fraction * len(x_NF)))
    if not 0 < split < len(x_NF):
        raise ValueError(f"{len(x_NF)} examples cannot be split {train_fraction:.2f} / {1 - train_fraction:.2f}")
    model = fit_ridge_classifier(x_NF[:split], y_N[:split], num_classes)
    test_y = y_N[split:]
    accuracy = float((predict(model, x_NF[split:]) == test_y).mean())
    chance = float(np.bincount(test_y, minlength=num_classes).max() / len(test_y))
    return {"accuracy": accuracy, "chance": chance, "train": split, "test": len(test_y)}


@torch.no_grad()
def frame_features(ev, images: np.ndarray, rows: int = 64) -> np.ndarray:
    """Mean-pooled frame hidden states [depth = n_layers + 1, images, D]."""
    tk, model = ev.tokenizer, ev.model
    latent_dim = model.config.latent_dim
    latents = ev.reading_latents(images)
    docs = [understanding_document(z, [], tk, latent_dim, dual_encoder=ev.dual_encoder) for z in latents]
    first_block = next(iter(model.layers.values()))
    embeddings: list[torch.Tensor] = []
    handle = first_block.register_forward_pre_hook(lambda _m, inputs: embeddings.append(inputs[0].detach()))
    pooled = []
    try:
        with layer_outputs(model) as captured:
            for batch in document_batches(docs, tk.pad_id, latent_dim, rows, getattr(model.config, "understanding_dim", 0)):
                embeddings.clear()
                captured.clear()
                none = torch.zeros_like(batch["denoise"])
                forward(model, batch, batch["latents"], torch.ones(batch["tokens"].shape), none, none)
                frame_BL = (batch["modality"] == VISION).float()
                weights_BL = frame_BL / frame_BL.sum(1, keepdim=True)
                states = [embeddings[0], *captured]
                pooled.append(torch.stack([(h.float() * weights_BL[..., None]).sum(1) for h in states]))
    finally:
        handle.remove()
    return torch.cat(pooled, dim=1).numpy()


def probe_sets(count: int, seed: int, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """label -> (images [N, S, S, 3], labels [N], classes)."""
    from unimm.data_pipelines import procedural
    from unimm.evaluation.captioning import single_object_images

    singles = single_object_images(count, seed + 11, image_size)
    # shuffle so the train/test split does not follow the Latin-square order
    order = np.random.default_rng([seed, 0x9B]).permutation(len(singles))
    singles = [singles[int(i)] for i in order]
    images = np.stack([s[0] for s in singles])
    colours, shapes = list(procedural.COLOURS), list(procedural.SHAPES)
    scenes = [procedural.image_sample(i, seed, image_size) for i in range(count)]
    return {
        "colour": (images, np.array([colours.index(s[1]) for s in singles]), len(colours)),
        "shape": (images, np.array([shapes.index(s[2]) for s in singles]), len(shapes)),
        "count": (np.stack([s["image"] for s in scenes]), np.array([len(s["objects"]) - 1 for s in scenes]), 3),
    }


def run_probes(ev, out_dir, *, samples: int, seed: int, progress) -> dict:
    results: dict[str, list[dict]] = {}
    features: dict[int, np.ndarray] = {}
    for label, (images, y, classes) in progress(probe_sets(samples, seed, ev.understanding_image_size).items(), desc="probes"):
        key = id(images)  # colour and shape label the same images: one forward pass for both
        if key not in features:
            features[key] = frame_features(ev, images)
        results[label] = [probe_accuracy(f, y, classes) for f in features[key]]
    plot = _plot(results, out_dir / "probes.png")
    return {"seed": seed, "samples": samples, "depth": "0 = input embeddings, l = after block l",
            "labels": results, "figures": [plot]}


def _plot(results: dict[str, list[dict]], path) -> str:
    from unimm.evaluation.report import figure, save

    fig = figure((5.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for label, rows in results.items():
        line = ax.plot(range(len(rows)), [r["accuracy"] for r in rows], marker="o", label=label)[0]
        ax.axhline(rows[0]["chance"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("depth (0 = embeddings)")
    ax.set_ylabel("probe test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("linear probes of frame hidden states (dotted: chance)")
    ax.legend(fontsize="small")
    return save(fig, path)
