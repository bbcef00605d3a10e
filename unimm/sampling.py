"""Mixed-mode generation with one KV cache (paper §2.1, App. E.3).

Text is sampled token by token. When the model emits ``<boi>``, a frame of noise latents is
appended and denoised in place by an Euler sampler over the flow (25 steps, classifier-free
guidance 3.0 by default); the finished frame is written into the cache as clean context
(t = 1, as images that condition text are seen in training), ``<eoi>`` follows, and text
continues. The unconditional branch of guidance is the context a dropped caption leaves in
training: ``<bos> <boi>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unimm.data.batch import TEXT, VISION
from unimm.flow import FlowMatchingConfig, predicted_velocity, shift_t
from unimm.model.attention import LayerKVCache
from unimm.model.transformer import UnimmModel


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    euler_steps: int = 25
    cfg_scale: float = 3.0
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy decoding."""


class Context:
    """One sequence being generated: its per-layer KV cache and length."""

    def __init__(self, n_layers: int):
        self.caches = [LayerKVCache() for _ in range(n_layers)]
        self.length = 0


class MixedModalSampler:
    def __init__(
        self,
        model: UnimmModel,
        tokenizer,
        flow: FlowMatchingConfig,
        shift: float,
        tokens_per_frame: int,
        config: SamplingConfig,
        generator: torch.Generator | None = None,
    ):
        self.model, self.tokenizer, self.flow, self.shift = model.eval(), tokenizer, flow, shift
        self.tokens_per_frame, self.config, self.generator = tokens_per_frame, config, generator
        self.latent_dim = model.config.latent_dim
        self.device = next(model.parameters()).device

    def new_context(self) -> Context:
        return Context(len(self.model.layers))

    # -- running the model on new positions ----------------------------------------------

    @torch.no_grad()
    def _run(self, ctx: Context, tokens, latents, t, modality: int, commit: bool) -> torch.Tensor:
        """Hidden states [n, D] of n new positions: a run of text (causal among themselves)
        or one frame (bidirectional), all seeing the whole cache."""
        n = tokens.shape[0]
        new_mask = torch.ones(n, n, dtype=torch.bool, device=self.device)
        if modality == TEXT:
            new_mask = new_mask.tril()
        mask = torch.cat([torch.ones(n, ctx.length, dtype=torch.bool, device=self.device), new_mask], dim=1)
        positions = torch.arange(ctx.length, ctx.length + n, device=self.device)
        for cache in ctx.caches:
            cache.commit = commit
        h, _ = self.model.hidden_states(
            tokens[None], latents[None], t[None], torch.full((1, n), modality, device=self.device),
            positions[None], mask[None, None], ctx.caches,
        )
        if commit:
            ctx.length += n
        return h[0]

    @torch.no_grad()
    def feed_text(self, ctx: Context, ids: list[int]) -> torch.Tensor:
        """Append text; return the logits after its last token."""
        tokens = torch.tensor(ids, device=self.device)
        latents = torch.zeros(len(ids), self.latent_dim, device=self.device)
        h = self._run(ctx, tokens, latents, torch.ones(len(ids), device=self.device), TEXT, commit=True)
        return self.model.lm_head(h[-1])

    def feed_frame(self, ctx: Context, latents: torch.Tensor) -> None:
        """Append a clean frame [N, C] as context."""
        self._run(ctx, self._pad_tokens(), latents, torch.ones(len(latents), device=self.device), VISION, commit=True)

    def _pad_tokens(self) -> torch.Tensor:
        return torch.full((self.tokens_per_frame,), self.tokenizer.pad_id, device=self.device)

    # -- images ---------------------------------------------------------------------------

    @torch.no_grad()
    def _velocity(self, ctx: Context, z: torch.Tensor, t: float) -> torch.Tensor:
        t_N = torch.full((len(z),), t, device=self.device)
        h = self._run(ctx, self._pad_tokens(), z, t_N, VISION, commit=False)
        return predicted_velocity(self.model.flow_head(h).float(), z, t_N[:, None], self.flow)

    def denoise_frame(self, cond: Context, uncond: Context | None) -> torch.Tensor:
        """Euler integration of the flow from noise (t = 0) to a clean frame (t = 1), on the
        training's shifted time grid; both contexts must end with ``<boi>``."""
        z = torch.randn(self.tokens_per_frame, self.latent_dim, generator=self.generator, device=self.device)
        grid = shift_t(torch.linspace(0.0, 1.0, self.config.euler_steps + 1), self.shift).tolist()
        for t, t_next in zip(grid[:-1], grid[1:]):
            v = self._velocity(cond, z, t)
            if uncond is not None and self.config.cfg_scale != 1.0:
                v_uncond = self._velocity(uncond, z, t)
                v = v_uncond + self.config.cfg_scale * (v - v_uncond)
            z = z + (t_next - t) * v
        return z

    def text_to_image(self, caption: str) -> torch.Tensor:
        """Latents [N, C] of an image generated for ``caption`` (the T->I layout of training)."""
        tk = self.tokenizer
        cond, uncond = self.new_context(), self.new_context()
        self.feed_text(cond, [tk.bos_id, *tk.encode(caption), tk.boi_id])
        self.feed_text(uncond, [tk.bos_id, tk.boi_id])
        return self.denoise_frame(cond, uncond)

    # -- text -----------------------------------------------------------------------------

    def _pick(self, logits: torch.Tensor) -> int:
        if self.config.temperature <= 0:
            return int(logits.argmax())
        probs = (logits.float() / self.config.temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def continue_text(self, ctx: Context, logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """Generate until ``<eos>`` or ``max_new_tokens``; frames are generated whenever the
        model emits ``<boi>``. Returns the new token ids and the generated frames."""
        tk = self.tokenizer
        ids, frames = [], []
        for _ in range(self.config.max_new_tokens):
            token = self._pick(logits)
            ids.append(token)
            if token == tk.eos_id:
                break
            logits = self.feed_text(ctx, [token])
            if token == tk.boi_id:
                uncond = self.new_context()
                self.feed_text(uncond, [tk.bos_id, tk.boi_id])
                frame = self.denoise_frame(ctx, uncond)
                frames.append(frame)
                self.feed_frame(ctx, frame)
                ids.append(tk.eoi_id)
                logits = self.feed_text(ctx, [tk.eoi_id])
        return ids, frames

    def image_to_text(self, latents: torch.Tensor) -> str:
        """Caption of a frame (the I->T layout of training: <bos> <boi> image <eoi> caption)."""
        tk = self.tokenizer
        ctx = self.new_context()
        self.feed_text(ctx, [tk.bos_id, tk.boi_id])
        self.feed_frame(ctx, latents)
        ids, _ = self.continue_text(ctx, self.feed_text(ctx, [tk.eoi_id]))
        return tk.decode(ids)
