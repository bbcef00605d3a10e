"""`unimm convert dense-to-mot`: a Mixture-of-Transformers start from a dense or modality-FFN
checkpoint (seed 000 §2.3, after Shi et al. 2025 and BAGEL: the MoT is initialised from a
trained joint decoder by copying its language weights into both modality transformers).

Every per-modality weight of the MoT gets the dense weight in both rows (text and vision): the
attention projections (transposed into the grouped-GEMM layout [2, in, out]), the attention and
FFN pre-norms, the final norm and a shared FFN. A modality-FFN model's two FFNs are already
the MoT's FFN layout and carry over as they are. Token embedding, LM head, visual adapters and
flow head are shared and copied. The MoT therefore computes exactly what the source computes
(up to float rounding of the grouped GEMM), and the two copies part ways once training starts.

The weights land in ``RUN/checkpoint/step-0`` as a model-only checkpoint, as `from-hf` writes:
`unimm train --recipe debug_cpu_mot --out RUN` (or ``mot_2b5``) resumes from it with a fresh
optimizer at step 1; any other run starts from it with
``--checkpoint.initial_load_path $PWD/RUN/checkpoint/step-0 --checkpoint.initial_load_model_only``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from unimm.convert.architecture import Architecture, check_shapes, flavor_differences, resolve_architecture
from unimm.convert.dcp_io import DcpCheckpoint, save_model_checkpoint
from unimm.convert.staging import seed_checkpoint_destination, staged_folder
from unimm.errors import ConfigError
from unimm.model.transformer import UnimmModel

MARKER = "unimm_dense_to_mot.json"
"""Written into the step-0 folder dense-to-mot makes: the only checkpoint --overwrite may replace."""

SOURCE_KINDS = ("shared", "modality")
_LINEAR = re.compile(r"^layers\.\d+\.attention\.w[qkvo]\.weight$")  # nn.Linear [out, in]
_NORM = re.compile(r"^(layers\.\d+\.(attention_norm|ffn_norm)|norm)\.weight$")  # [D]
_SHARED_FFN = re.compile(r"^(layers\.\d+\.feed_forward)\.ffn\.(w[123])\.weight$")  # nn.Linear [out, in]


def mot_config(source: UnimmModel.Config) -> UnimmModel.Config:
    """The MoT of ``source``'s size (a shared- or modality-FFN model)."""
    if source.ffn.kind not in SOURCE_KINDS:
        raise ConfigError(
            f"a Mixture of Transformers starts from a dense (shared FFN) or modality-FFN model; this one's "
            f"FFN is {source.ffn.kind!r}, whose weights have no per-modality counterpart"
        )
    return dataclasses.replace(source, ffn=dataclasses.replace(source.ffn, kind="mot"))


def _both(w: torch.Tensor) -> torch.Tensor:
    """The same weight for text (row 0) and vision (row 1)."""
    return torch.stack([w, w]).contiguous()


def mot_state_from_dense(state: dict[str, torch.Tensor], source: UnimmModel.Config) -> dict[str, torch.Tensor]:
    """The weights of ``mot_config(source)`` that compute what ``state`` (weights of ``source``,
    native names) computes. Shapes are checked against the MoT model."""
    target = mot_config(source)
    mot: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if _LINEAR.match(name):
            mot[name] = _both(w.T)
        elif _NORM.match(name):
            mot[name] = _both(w)
        elif match := _SHARED_FFN.match(name):
            mot[f"{match[1]}.experts.{match[2]}"] = _both(w.T)
        else:  # embeddings, heads, visual adapters; a modality FFN's stacked experts
            mot[name] = w
    check_shapes(target, {name: tuple(w.shape) for name, w in mot.items()}, Path("<dense-to-mot>"), "the MoT")
    return mot


def dense_to_mot(
    checkpoint: Path, run: Path, recipe: str | None = None, overrides: tuple[str, ...] = (), overwrite: bool = False
) -> tuple[Architecture, list[str]]:
    """Write ``run/checkpoint/step-0``, the MoT of the dense or modality-FFN ``checkpoint``
    (whose architecture is ``recipe`` with ``overrides``, or the registered flavor its tensors
    match); return the source architecture and the registered flavors the result matches."""
    if overrides and recipe is None:
        raise ConfigError(f"{' '.join(overrides)}: --section.key options need --recipe NAME")
    step0 = seed_checkpoint_destination(run, overwrite, "dense-to-mot", MARKER, "Pass a new --out")
    source = DcpCheckpoint(checkpoint)
    arch = resolve_architecture(source.shapes(), checkpoint, recipe, list(overrides))
    state = mot_state_from_dense(source.load(), arch.model)
    with staged_folder(step0, overwrite) as folder:
        save_model_checkpoint(state, folder)
        marker = {"written_by": "unimm convert dense-to-mot", "source": str(checkpoint.resolve()), "source_architecture": arch.source}
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    shapes = {name: tuple(w.shape) for name, w in state.items()}
    return arch, [name for name, differences in flavor_differences(shapes).items() if not differences]
