"""torchtitan's model registry for unimm: flavors (sizes) -> ModelSpec."""

from __future__ import annotations

from collections.abc import Callable

from torchtitan.protocols.model_spec import ModelSpec

from unimm.convert.state_dict_adapter import UnimmStateDictAdapter
from unimm.model.ffn import FFNConfig
from unimm.model.moe import MoEConfig
from unimm.model.transformer import UnimmModel


def _paper_backbone(ffn_kind: str, moe: MoEConfig | None = None) -> UnimmModel.Config:
    # Paper §2.2 / App. E.7: 16 layers, d_model 2048, 32 query / 8 KV heads, FFN hidden
    # 8192, Llama-3 vocabulary, sequence 4096, SigLIP 2 So400m latents (1152 wide).
    return UnimmModel.Config(
        vocab_size=128_256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn=FFNConfig(kind=ffn_kind, hidden_dim=8192, moe=moe or MoEConfig()),
        max_seq_len=4096,
        latent_dim=1152,
    )


def _debug(ffn_kind: str, moe: MoEConfig | None = None) -> UnimmModel.Config:
    # Small enough to train a few hundred steps on 2 CPU cores in minutes. The byte
    # tokenizer's 261 ids; 8x8 raw-pixel patches of 32x32 RGB images (192 wide).
    return UnimmModel.Config(
        vocab_size=261,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn=FFNConfig(kind=ffn_kind, hidden_dim=384, moe=moe or MoEConfig()),
        max_seq_len=512,
        latent_dim=192,
        rope_theta=10_000.0,
    )


def _paper_moe(granularity: int, num_experts: int, shared: str = "none") -> UnimmModel.Config:
    # G = 4 * d_model / d_expert (eq. 4); top-k = G keeps the active FFN width at 4 * d_model,
    # i.e. the dense model's compute (App. E.7).
    return _paper_backbone(
        "moe",
        MoEConfig(
            num_experts=num_experts,
            top_k=granularity,
            expert_hidden_dim=4 * 2048 // granularity,
            shared=shared,
        ),
    )


def _dual(model: UnimmModel.Config, *, latent_dim: int, understanding_dim: int) -> UnimmModel.Config:
    model.latent_dim, model.understanding_dim = latent_dim, understanding_dim
    return model


FLAVORS: dict[str, Callable[[], UnimmModel.Config]] = {
    "debug": lambda: _debug("shared"),
    "debug_modality": lambda: _debug("modality"),
    # 8 experts of width 96, 2 active: the debug model's dense FFN compute (2 * 96 < 384) is
    # not matched on purpose; the model only has to train and route on CPU.
    "debug_moe": lambda: _debug("moe", MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=96)),
    # The paper's final MoE layout on CPU: a text and a vision shared expert (only the token's
    # own is active) beside 6 routed experts, 2 of them picked.
    "debug_moe_per_modality": lambda: _debug(
        "moe", MoEConfig(num_experts=8, top_k=3, expert_hidden_dim=96, shared="per_modality")
    ),
    "dense_1b5": lambda: _paper_backbone("shared"),
    "modality_ffn_2b3": lambda: _paper_backbone("modality"),
    # Sparsity sweep (Table 5): G = 16, 16 active experts of width 512, E from 32 to 1008.
    **{f"moe_e{e}": (lambda e=e: _paper_moe(16, e)) for e in (32, 64, 128, 256, 512, 1008)},
    # Granularity sweep (Fig. 15): E = 16 G experts (1008 at G = 64), top-G, width 8192 / G.
    **{f"moe_g{g}": (lambda g=g: _paper_moe(g, min(16 * g, 1008))) for g in (1, 4, 16, 32, 64)},
    # Shared-expert variants at E = 256 (Table 2).
    "moe_e256_shared_global": lambda: _paper_moe(16, 256, "global"),
    "moe_e256_shared_per_modality": lambda: _paper_moe(16, 256, "per_modality"),
    # Mixture of Transformers (§6.3's deep separation): per-modality attention projections,
    # norms and FFNs, one global attention; the dense backbone doubled, 2.47B total / 1.50B active.
    "mot_2b5": lambda: _paper_backbone("mot"),
    "debug_mot": lambda: _debug("mot"),
    # Dual encoder (§6.3's baseline, as in Janus and Bagel), on modality FFNs as in the paper's
    # comparison: SD-VAE latents (4 channels folded 2x2: 16 wide) in and out of the flow,
    # SigLIP 2 So400m features (1152 wide) in through understanding_proj at I->T images.
    "dual_encoder_2b3": lambda: _dual(_paper_backbone("modality"), latent_dim=16, understanding_dim=1152),
    # CPU stand-in: raw-pixel 8x8 patches of 32 px images (192 wide) to generate, 4x4 patches
    # of the same images at 16 px (48 wide, also 16 tokens) to understand.
    "debug_dual_encoder": lambda: _dual(_debug("modality"), latent_dim=192, understanding_dim=48),
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
        state_dict_adapter=UnimmStateDictAdapter,
    )
