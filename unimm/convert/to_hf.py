"""`unimm convert to-hf`: a torchtitan DCP checkpoint to a Hugging Face model folder.

``--format unimm``: the whole model; transformers loads it with ``trust_remote_code=True``
from the modeling files that travel in the folder. ``--format llama``: the text backbone of a
shared-FFN model as a stock LlamaForCausalLM, for tools that know Llama and nothing else.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from unimm.convert import hf_model
from unimm.convert.architecture import Architecture, resolve_architecture
from unimm.convert.dcp_io import DcpCheckpoint
from unimm.convert.hf_config import llama_config_kwargs, unimm_config_kwargs
from unimm.convert.hf_tokenizer import export_tokenizer
from unimm.convert.model_card import model_card
from unimm.convert.safetensors_io import write_safetensors
from unimm.convert.staging import staged_folder, training_state
from unimm.convert.state_dict_adapter import UnimmStateDictAdapter, from_hf_name
from unimm.errors import ConfigError
from unimm.model.params import ADAPTER_MODULES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELING_FILES = ("configuration_unimm.py", "modeling_unimm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_unimm.UnimmConfig",
    "AutoModel": "modeling_unimm.UnimmModel",
    "AutoModelForCausalLM": "modeling_unimm.UnimmForCausalLM",
}


@dataclass(frozen=True, kw_only=True)
class ExportRequest:
    checkpoint: Path
    out: Path
    fmt: Literal["unimm", "llama"] = "unimm"
    dtype: Literal["fp32", "bf16"] = "fp32"
    recipe: str | None = None
    """The run's recipe; None: recognise a registered model flavor by its tensors."""
    overrides: tuple[str, ...] = ()
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    allow_nonfinite: bool = False
    """Export NaN/Inf weights (with a warning) instead of refusing the checkpoint."""

    def __post_init__(self) -> None:
        if self.overrides and self.recipe is None:
            raise ConfigError(f"{' '.join(self.overrides)}: --section.key options need --recipe NAME")


def _write_unimm_config(arch: Architecture, special_ids: dict[str, int], dtype: torch.dtype, folder: Path) -> None:
    from unimm.convert.hf_model.configuration_unimm import UnimmConfig

    config = UnimmConfig(**unimm_config_kwargs(arch.model, special_ids), dtype=dtype)
    config.architectures = ["UnimmForCausalLM"]
    config.auto_map = AUTO_MAP
    config.save_pretrained(folder)
    for name in MODELING_FILES:
        shutil.copyfile(Path(hf_model.__file__).parent / name, folder / name)


def _write_llama_config(arch: Architecture, special_ids: dict[str, int], dtype: torch.dtype, folder: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**llama_config_kwargs(arch.model, special_ids), dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)


def _hf_weights(checkpoint: DcpCheckpoint, arch: Architecture, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = checkpoint.load()
    if fmt == "llama":  # Llama has no visual adapters and no flow head
        state = {name: t for name, t in state.items() if name.split(".")[0] not in ADAPTER_MODULES}
    return {
        name: t.to(dtype) if t.is_floating_point() else t
        for name, t in UnimmStateDictAdapter(arch.model, None).to_hf(state).items()
    }


def _nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """One line per tensor holding NaN or Inf, by the checkpoint's (native) name."""
    found = []
    for name, t in state.items():
        if not t.is_floating_point() or torch.isfinite(t).all():
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        found.append(f"{from_hf_name(name)} ({nan + inf} of {t.numel()}: {nan} NaN, {inf} Inf)")
    return found


def _check_finite(state: dict[str, torch.Tensor], request: ExportRequest) -> None:
    if not (found := _nonfinite(state)):
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    what = f"{request.checkpoint}: {len(found)} tensor(s) hold non-finite values: {shown}"
    if not request.allow_nonfinite:
        raise ConfigError(
            f"{what}; refusing to export them. Export an earlier checkpoint, or pass --allow-nonfinite "
            "to write them anyway (e.g. to inspect the damage)"
        )
    print(f"unimm: warning: {what}; exporting them as they are (--allow-nonfinite)", file=sys.stderr)


def export_to_hf(request: ExportRequest) -> Architecture:
    from transformers import GenerationConfig

    if request.overwrite and (state := training_state(request.out)):
        raise ConfigError(
            f"{request.out} holds training state ({', '.join(map(str, state))}); --overwrite replaces only "
            "a Hugging Face folder, never a run or a checkpoint: pass another --out"
        )
    checkpoint = DcpCheckpoint(request.checkpoint)
    arch = resolve_architecture(checkpoint.shapes(), request.checkpoint, request.recipe, list(request.overrides))
    if request.fmt == "llama" and arch.model.ffn.kind == "mot":
        raise ConfigError(
            f"{request.checkpoint}: --format llama cannot hold a Mixture of Transformers: its attention "
            "projections, norms and FFNs are per modality (a text and a vision copy of every block), "
            "and a LlamaForCausalLM has one of each; --format unimm exports it"
        )
    if request.fmt == "llama" and arch.model.ffn.kind != "shared":
        raise ConfigError(
            f"{request.checkpoint}: --format llama needs a shared (dense) FFN, this model's is "
            f"{arch.model.ffn.kind!r}; --format unimm exports it"
        )
    dtype = DTYPES[request.dtype]
    with staged_folder(request.out, request.overwrite) as folder:
        exported = export_tokenizer(arch.tokenizer, arch.model.vocab_size, arch.model.max_seq_len)
        weights = _hf_weights(checkpoint, arch, request.fmt, dtype)
        _check_finite(weights, request)
        write_safetensors(weights, folder, request.max_shard_bytes)
        del weights
        exported.tokenizer.save_pretrained(folder)
        ids = exported.special_ids
        write_config = _write_llama_config if request.fmt == "llama" else _write_unimm_config
        write_config(arch, ids, dtype, folder)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(folder)
        card = model_card(arch, request.fmt, request.checkpoint, str(dtype).removeprefix("torch."), request.out.name)
        (folder / "README.md").write_text(card)
    return arch
