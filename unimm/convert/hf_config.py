"""The architecture in Hugging Face config.json terms, both ways.

Fields are named the way Llama's config names them wherever the meaning is the same, so the
unimm config and the plain-Llama config share one description of the text backbone.
Training-only settings (attention and grouped-GEMM backends, load balancing) do not travel:
`unimm train` takes them from its recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unimm.errors import ConfigError
from unimm.model.ffn import FFNConfig
from unimm.model.moe import MoEConfig
from unimm.model.transformer import UnimmModel

def _backbone(model: UnimmModel.Config, special_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.ffn.hidden_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "tie_word_embeddings": False,
        "pad_token_id": special_ids["pad"],
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
    }


def unimm_config_kwargs(model: UnimmModel.Config, special_ids: dict[str, int]) -> dict[str, Any]:
    """Keyword arguments of the exported UnimmConfig."""
    kwargs = _backbone(model, special_ids) | {
        "ffn_kind": model.ffn.kind,
        "latent_dim": model.latent_dim,
        "time_freq_dim": model.time_freq_dim,
        "understanding_dim": model.understanding_dim,
        "boi_token_id": special_ids["boi"],
        "eoi_token_id": special_ids["eoi"],
    }
    if model.ffn.kind == "moe":
        moe = model.ffn.moe
        kwargs |= {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.expert_hidden_dim,
            "shared_experts": moe.shared,
            "router_score_func": moe.score_func,
        }
    return kwargs


def llama_config_kwargs(model: UnimmModel.Config, special_ids: dict[str, int]) -> dict[str, Any]:
    """Keyword arguments of a stock LlamaConfig for the text backbone (shared FFN only)."""
    return _backbone(model, special_ids) | {
        "head_dim": model.dim // model.n_heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def model_config_from_hf(config: dict[str, Any], where: Path) -> UnimmModel.Config:
    """The UnimmModel.Config a unimm config.json describes."""
    try:
        ffn = FFNConfig(kind=config["ffn_kind"], hidden_dim=config["intermediate_size"])
        if ffn.kind == "moe":
            ffn.moe = MoEConfig(
                num_experts=config["num_experts"],
                top_k=config["num_experts_per_tok"],
                expert_hidden_dim=config["moe_intermediate_size"],
                shared=config["shared_experts"],
                score_func=config["router_score_func"],
            )
        return UnimmModel.Config(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config["num_key_value_heads"],
            ffn=ffn,
            norm_eps=config["rms_norm_eps"],
            rope_theta=config["rope_theta"],
            max_seq_len=config["max_position_embeddings"],
            latent_dim=config["latent_dim"],
            time_freq_dim=config["time_freq_dim"],
            # absent from folders written before dual-encoder export: one encoder
            understanding_dim=config.get("understanding_dim", 0),
        )
    except KeyError as missing:
        raise ConfigError(f"{where}: no {missing} field; is this a folder `unimm convert to-hf` wrote?") from None
