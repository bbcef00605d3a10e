"""Configuration of a unimm model exported for Hugging Face transformers.

Shipped inside every folder `unimm convert to-hf` writes and loaded with
``trust_remote_code=True``; it imports only transformers. Names follow Llama's where the
meaning is the same, so the text backbone reads like any other decoder's configuration.
"""

from transformers import PretrainedConfig

FFN_KINDS = ("shared", "modality", "moe", "mot")
SHARED_EXPERT_MODES = {"none": 0, "global": 1, "per_modality": 2}


class UnimmConfig(PretrainedConfig):
    """One decoder over text tokens and visual latent patches (Transfusion family).

    ffn_kind: ``shared`` (one SwiGLU FFN), ``modality`` (expert 0 for text tokens, expert 1
    for visual ones), ``moe`` (``num_experts`` experts of width ``moe_intermediate_size``,
    ``num_experts_per_tok`` active per token, the ``shared_experts`` ones included) or ``mot``
    (Mixture of Transformers: the modality FFN, and per-modality attention projections and
    norms, the final norm included; one attention over all tokens).
    latent_dim: width of one visual latent patch; time_freq_dim: sinusoidal features of the
    flow-matching time t in [0, 1] (t = 1 is a clean latent).
    understanding_dim: dual encoder (as in Janus and Bagel): width of the understanding
    encoder's latents, read at understanding (I->T) frames through a second input projection
    ``understanding_proj`` with no time embedding; 0: one encoder.
    """

    model_type = "unimm"
    # The cache output's name before and since transformers 5.24 (Trainer leaves it out of predictions).
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 128_256,
        hidden_size: int = 2048,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        ffn_kind: str = "shared",
        num_experts: int = 0,
        num_experts_per_tok: int = 0,
        moe_intermediate_size: int = 0,
        shared_experts: str = "none",
        router_score_func: str = "softmax",
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500_000.0,
        max_position_embeddings: int = 4096,
        latent_dim: int = 1152,
        time_freq_dim: int = 256,
        understanding_dim: int = 0,
        boi_token_id: int | None = None,
        eoi_token_id: int | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if ffn_kind not in FFN_KINDS:
            raise ValueError(f"ffn_kind must be one of {FFN_KINDS}, got {ffn_kind!r}")
        if shared_experts not in SHARED_EXPERT_MODES:
            raise ValueError(f"shared_experts must be one of {sorted(SHARED_EXPERT_MODES)}, got {shared_experts!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.ffn_kind = ffn_kind
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_experts = shared_experts
        self.router_score_func = router_score_func
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.latent_dim = latent_dim
        self.time_freq_dim = time_freq_dim
        self.understanding_dim = understanding_dim
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
