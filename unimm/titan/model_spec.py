"""torchtitan's model registry for unimm: flavors (sizes) -> ModelSpec."""

from __future__ import annotations

from collections.abc import Callable

from torchtitan.protocols.model_spec import ModelSpec

from unimm.model.ffn import FFNConfig
from unimm.model.transformer import UnimmModel


def _paper_backbone(ffn_kind: str) -> UnimmModel.Config:
    # Paper §2.2 / App. E.7: 16 layers, d_model 2048, 32 query / 8 KV heads, FFN hidden
    # 8192, Llama-3 vocabulary, sequence 4096, SigLIP 2 So400m latents (1152 wide).
    return UnimmModel.Config(
        vocab_size=128_256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn=FFNConfig(kind=ffn_kind, hidden_dim=8192),
        max_seq_len=4096,
        latent_dim=1152,
    )


def _debug(ffn_kind: str) -> UnimmModel.Config:
    # Small enough to train a few hundred steps on 2 CPU cores in minutes. The byte
    # tokenizer's 261 ids; 8x8 raw-pixel patches of 32x32 RGB images (192 wide).
    return UnimmModel.Config(
        vocab_size=261,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn=FFNConfig(kind=ffn_kind, hidden_dim=384),
        max_seq_len=512,
        latent_dim=192,
        rope_theta=10_000.0,
    )


FLAVORS: dict[str, Callable[[], UnimmModel.Config]] = {
    "debug": lambda: _debug("shared"),
    "debug_modality": lambda: _debug("modality"),
    "dense_1b5": lambda: _paper_backbone("shared"),
    "modality_ffn_2b3": lambda: _paper_backbone("modality"),
}


def model_registry(flavor: str) -> ModelSpec:
    from unimm.titan.parallelize import parallelize_unimm

    if flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor {flavor!r}; known: {sorted(FLAVORS)}")
    return ModelSpec(
        name="unimm",
        flavor=flavor,
        model=FLAVORS[flavor](),
        parallelize_fn=parallelize_unimm,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=None,
    )
