"""The one name mapping between unimm's native parameters and its Hugging Face layout.

Native names are UnimmModel's module paths (what torchtitan's DCP checkpoints hold); the HF
names are Llama's wherever the module is Llama's (``model.layers.N.self_attn.q_proj.weight``,
``mlp.gate_proj``, ...), so a dense text checkpoint is weight for weight a LlamaForCausalLM
plus the visual adapters. The input adapters (``latent_proj``, ``time_embedding`` and a dual
encoder's ``understanding_proj``) keep their names under ``model.``; the heads (``lm_head``,
``flow_head``) sit beside it. The mapping is a rule over the dotted components of a name, not a
table of full names: a new FFN variant's parameters (``feed_forward.experts.w1``,
``feed_forward.router.gate.weight``, ...) map with no change here, and every conversion checks
that the rule inverts exactly on each name it converts.

q and k projections are also permuted row-wise: torchtitan's ComplexRoPE rotates adjacent
pairs (2i, 2i+1) of each head, HF's rotate_half rotates (i, i + head_dim/2). Permuting the
rows that produce each head makes the two conventions compute the same attention. A Mixture
of Transformers stacks its per-modality projections as [2, in, out] (``x @ w[m]``): there the
permuted dimension is the last one, in each modality's weight.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from unimm.errors import ConfigError
from unimm.model.transformer import UnimmModel

# native module name -> HF module name, for each dotted component of a parameter's name
COMPONENTS = {
    "tok_embeddings": "embed_tokens",
    "attention": "self_attn",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward": "mlp",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}
_INVERSE = {hf: native for native, hf in COMPONENTS.items()}
# Top-level modules that sit beside HF's base model (``model.``) rather than inside it.
HEADS = ("lm_head", "flow_head")
BASE_PREFIX = "model."
# The shared FFN's extra ``ffn`` level has no counterpart in Llama's MLP.
_NATIVE_SHARED_FFN = re.compile(r"^(layers\.\d+\.feed_forward)\.ffn\.(w[123]\.weight)$")
_HF_SHARED_FFN = re.compile(r"^(layers\.\d+\.mlp\.(?:gate|up|down)_proj\.weight)$")
# Projections whose rows RoPE rotates (per-modality attention variants included).
_ROTATED = ("wq", "wk")


def _hf_name(native: str) -> str:
    collapsed = _NATIVE_SHARED_FFN.sub(r"\1.\2", native)
    parts = [COMPONENTS.get(part, part) for part in collapsed.split(".")]
    return ("" if parts[0] in HEADS else BASE_PREFIX) + ".".join(parts)


def _native_name(hf: str) -> str:
    if hf.split(".")[0] in HEADS:
        inner = hf
    elif hf.startswith(BASE_PREFIX):
        inner = hf[len(BASE_PREFIX) :]
    else:
        raise ConfigError(f"parameter {hf!r} is neither under {BASE_PREFIX!r} nor a head {HEADS}")
    native = ".".join(_INVERSE.get(part, part) for part in inner.split("."))
    if _HF_SHARED_FFN.match(inner):
        native = native.replace(".feed_forward.", ".feed_forward.ffn.", 1)
    return native


def to_hf_name(native: str) -> str:
    hf = _hf_name(native)
    if _native_name(hf) != native:
        raise ConfigError(
            f"parameter {native!r} has no reversible Hugging Face name ({hf!r} would read back as "
            f"{_native_name(hf)!r}); rename the module or extend unimm.convert.state_dict_adapter"
        )
    return hf


def from_hf_name(hf: str) -> str:
    native = _native_name(hf)
    if _hf_name(native) != hf:
        raise ConfigError(f"parameter {hf!r} is not a name unimm writes (it reads as {native!r})")
    return native


def _is_rotated(native: str) -> bool:
    parts = native.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _ROTATED


def interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from (re0, im0, re1, im1, ...) to (re0, re1, ..., im0, im1, ...)."""
    n = w.shape[0] // head_dim
    return w.view(n, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    n = w.shape[0] // head_dim
    return w.view(n, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute_heads(w: torch.Tensor, head_dim: int, permute) -> torch.Tensor:
    if w.dim() == 3:  # MoT [2, in, out]: the output features are the last dimension
        return permute(w.movedim(-1, 0).contiguous(), head_dim).movedim(0, -1).contiguous()
    return permute(w, head_dim)


class UnimmStateDictAdapter(StateDictAdapter):
    """torchtitan's hook for --checkpoint.last_save_in_hf / initial_load_in_hf, and the
    mapping `unimm convert` uses."""

    def __init__(self, model_config: UnimmModel.Config, hf_assets_path: str | None):
        # StateDictAdapter reads the shard layout of an HF folder at hf_assets_path and warns
        # when there is none, which is every run of the byte tokenizer ("."): ask only when
        # a layout is there to read.
        has_index = bool(hf_assets_path) and os.path.isfile(
            os.path.join(hf_assets_path, "model.safetensors.index.json")
        )
        super().__init__(model_config, hf_assets_path if has_index else None)
        self.hf_assets_path = hf_assets_path
        self.head_dim = model_config.dim // model_config.n_heads

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {
            to_hf_name(name): _permute_heads(value, self.head_dim, interleaved_to_half) if _is_rotated(name) else value
            for name, value in state_dict.items()
        }

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = {}
        for hf, value in hf_state_dict.items():
            name = from_hf_name(hf)
            state_dict[name] = _permute_heads(value, self.head_dim, half_to_interleaved) if _is_rotated(name) else value
        return state_dict
