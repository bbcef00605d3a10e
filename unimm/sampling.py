"""Mixed-mode generation with one KV cache (paper §2.1, App. B, App. E.3).

Text is sampled token by token. When the model emits ``<boi>``, a frame of noise latents is
appended and denoised in place by an Euler sampler over the flow (25 steps on the training's
shifted time grid, classifier-free guidance 3.0 by default: v = v_uncond + s * (v_cond -
v_uncond)); the finished frame is written into the cache as clean context (t = 1), ``<eoi>``
follows, and text continues.

The unconditional branch of guidance is the context a dropped condition leaves in training
(``unimm.data.sequences``: the caption or action text is dropped, frames stay): the
conditional context less every text token but ``<bos>``, ``<boi>`` and ``<eoi>``. So a T->I
image is guided against ``<bos> <boi>``, the second frame of a video against
``<bos> <boi> f1 <eoi> <boi>``, an NWM target against its four context frames without the
action. Each context records that skeleton and builds its unconditional twin the first time a
frame is generated in it, then keeps the twin in step (frames are fed to both).

A dual-encoder model (``understanding_dim`` > 0, paper §6.3) reads an image to caption as the
understanding encoder's latents through its ``understanding_proj`` (``feed_frame(...,
understanding=True)``; `image_to_text` does so by default for such a model) and generates
frames in the generation encoder's latents, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unimm.data.batch import TEXT, VISION
from unimm.flow import FlowMatchingConfig, euler_step, time_grid
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
    """One sequence being generated: its per-layer KV cache and length, and what its
    unconditional branch holds (``skeleton`` until ``uncond`` is built)."""

    def __init__(self, n_layers: int, *, track_uncond: bool = True):
        self.caches = [LayerKVCache() for _ in range(n_layers)]
        self.length = 0
        # ("text", ids) / ("frame", latents) segments of the unconditional branch
        self.skeleton: list[tuple[str, object]] | None = [] if track_uncond else None
        self.uncond: Context | None = None


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
        self._structural = {tokenizer.bos_id, tokenizer.boi_id, tokenizer.eoi_id}

    def new_context(self) -> Context:
        return Context(len(self.model.layers))

    # -- running the model on new positions ----------------------------------------------

    @torch.no_grad()
    def _run(self, ctx: Context, tokens, latents, t, modality: int, commit: bool, understanding=None) -> torch.Tensor:
        """Hidden states [n, D] of n new positions: a run of text (causal among themselves)
        or one frame (bidirectional), all seeing the whole cache. ``understanding``: the
        understanding latents [n, C_u] of a dual encoder's understanding frame."""
        n = tokens.shape[0]
        new_mask = torch.ones(n, n, dtype=torch.bool, device=self.device)
        if modality == TEXT:
            new_mask = new_mask.tril()
        mask = torch.cat([torch.ones(n, ctx.length, dtype=torch.bool, device=self.device), new_mask], dim=1)
        positions = torch.arange(ctx.length, ctx.length + n, device=self.device)
        for cache in ctx.caches:
            cache.commit = commit
        extra = {}
        if understanding is not None:
            extra = {
                "understanding_BL": torch.ones(1, n, dtype=torch.bool, device=self.device),
                "understanding_latents_BLC": understanding[None].to(self.device),
            }
        h, _ = self.model.hidden_states(
            tokens[None], latents[None], t[None], torch.full((1, n), modality, device=self.device),
            positions[None], mask[None, None], ctx.caches, **extra,
        )
        if commit:
            ctx.length += n
        return h[0]

    @torch.no_grad()
    def feed_text(self, ctx: Context, ids: list[int]) -> torch.Tensor:
        """Append text; return the logits after its last token. Only ``<bos>``, ``<boi>``
        and ``<eoi>`` reach the unconditional branch (the rest is condition)."""
        tokens = torch.tensor(ids, device=self.device)
        latents = torch.zeros(len(ids), self.latent_dim, device=self.device)
        h = self._run(ctx, tokens, latents, torch.ones(len(ids), device=self.device), TEXT, commit=True)
        structural = [i for i in ids if i in self._structural]
        if structural:
            if ctx.uncond is not None:
                self.feed_text(ctx.uncond, structural)
            elif ctx.skeleton is not None:
                ctx.skeleton.append(("text", structural))
        return self.model.lm_head(h[-1])

    def feed_frame(self, ctx: Context, latents: torch.Tensor, understanding: bool = False) -> None:
        """Append a clean frame [N, C] as context (to the unconditional branch as well);
        ``understanding``: a dual encoder's understanding latents [N_u, C_u] instead."""
        n, ones = len(latents), torch.ones(len(latents), device=self.device)
        if understanding:
            zeros = torch.zeros(n, self.latent_dim, device=self.device)
            self._run(ctx, self._pad_tokens(n), zeros, ones, VISION, commit=True, understanding=latents)
        else:
            self._run(ctx, self._pad_tokens(n), latents, ones, VISION, commit=True)
        if ctx.uncond is not None:
            self.feed_frame(ctx.uncond, latents, understanding)
        elif ctx.skeleton is not None:
            ctx.skeleton.append(("understanding_frame" if understanding else "frame", latents))

    def _pad_tokens(self, n: int | None = None) -> torch.Tensor:
        return torch.full((n or self.tokens_per_frame,), self.tokenizer.pad_id, device=self.device)

    def unconditional(self, ctx: Context) -> Context:
        """The unconditional twin of ``ctx``: its frames and structural tokens, in order."""
        if ctx.uncond is None:
            if ctx.skeleton is None:
                raise ValueError("this context does not track an unconditional branch")
            uncond = Context(len(self.model.layers), track_uncond=False)
            text: list[int] = []
            for kind, segment in ctx.skeleton:
                if kind == "text":
                    text += segment
                    continue
                if text:
                    self.feed_text(uncond, text)
                    text = []
                self.feed_frame(uncond, segment, understanding=kind == "understanding_frame")
            if text:
                self.feed_text(uncond, text)
            ctx.uncond, ctx.skeleton = uncond, None
        return ctx.uncond

    # -- images ---------------------------------------------------------------------------

    @torch.no_grad()
    def _prediction(self, ctx: Context, z: torch.Tensor, t: float) -> torch.Tensor:
        """The flow head's output (velocity or clean latent, as trained) for frame ``z`` at t."""
        t_N = torch.full((len(z),), t, device=self.device)
        h = self._run(ctx, self._pad_tokens(), z, t_N, VISION, commit=False)
        return self.model.flow_head(h).float()

    def denoise_frame(self, cond: Context, uncond: Context | None = None) -> torch.Tensor:
        """Euler integration of the flow from noise (t = 0) to a clean frame (t = 1), on the
        training's shifted time grid; both contexts must end with ``<boi>``. ``uncond``
        defaults to ``cond``'s unconditional twin (no guidance when ``cfg_scale`` is 1).

        Guidance combines the head outputs, pred = u + s * (c - u): for v-prediction that
        is the guided velocity; for x-prediction the velocity (x - z) / (1 - t) is affine
        in x, so it is the same guided velocity, and the last step lands on the guided x."""
        guided = self.config.cfg_scale != 1.0
        if guided and uncond is None:
            uncond = self.unconditional(cond)
        z = torch.randn(self.tokens_per_frame, self.latent_dim, generator=self.generator, device=self.device)
        grid = time_grid(self.config.euler_steps, self.shift)
        for t, t_next in zip(grid[:-1], grid[1:]):
            pred = self._prediction(cond, z, t)
            if guided:
                pred_uncond = self._prediction(uncond, z, t)
                pred = pred_uncond + self.config.cfg_scale * (pred - pred_uncond)
            z = euler_step(pred, z, t, t_next, self.flow)
        return z

    def text_to_image(self, caption: str) -> torch.Tensor:
        """Latents [N, C] of an image generated for ``caption`` (the T->I layout of training)."""
        tk = self.tokenizer
        ctx = self.new_context()
        self.feed_text(ctx, [tk.bos_id, *tk.encode(caption), tk.boi_id])
        return self.denoise_frame(ctx)

    def _generate_frames(self, ctx: Context, num_frames: int) -> list[torch.Tensor]:
        """``num_frames`` frames in a row; ``ctx`` ends with ``<boi>`` and ends with ``<eoi>``."""
        tk, frames = self.tokenizer, []
        for i in range(num_frames):
            frame = self.denoise_frame(ctx)
            frames.append(frame)
            self.feed_frame(ctx, frame)
            self.feed_text(ctx, [tk.eoi_id] if i == num_frames - 1 else [tk.eoi_id, tk.boi_id])
        return frames

    def generate_video(self, caption: str, num_frames: int) -> list[torch.Tensor]:
        """Frames [N, C] of a video for ``caption`` (the video layout of training), each
        guided against the earlier frames without the caption."""
        tk = self.tokenizer
        ctx = self.new_context()
        self.feed_text(ctx, [tk.bos_id, *tk.encode(caption), tk.boi_id])
        return self._generate_frames(ctx, num_frames)

    def predict_frames(self, context: list[torch.Tensor], action: str, num_frames: int = 1) -> list[torch.Tensor]:
        """Frames that follow ``context`` frames under ``action`` (the action layout of
        training: NWM's 4 context frames and 1 target, annotated video's 1-4 and 1-4),
        guided against the context frames without the action."""
        tk = self.tokenizer
        ctx = self.new_context()
        self.feed_text(ctx, [tk.bos_id])
        for frame in context:
            self.feed_text(ctx, [tk.boi_id])
            self.feed_frame(ctx, frame)
            self.feed_text(ctx, [tk.eoi_id])
        self.feed_text(ctx, [*tk.encode(action), tk.boi_id])
        return self._generate_frames(ctx, num_frames)

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
                frame = self.denoise_frame(ctx)
                frames.append(frame)
                self.feed_frame(ctx, frame)
                ids.append(tk.eoi_id)
                logits = self.feed_text(ctx, [tk.eoi_id])
        return ids, frames

    def image_to_text(self, latents: torch.Tensor, understanding: bool | None = None) -> str:
        """Caption of a frame (the I->T layout of training: <bos> <boi> image <eoi> caption).
        ``understanding`` (default: whether the model is a dual encoder): ``latents`` are the
        understanding encoder's, read through ``understanding_proj``."""
        if understanding is None:
            understanding = bool(getattr(self.model.config, "understanding_dim", 0))
        tk = self.tokenizer
        ctx = self.new_context()
        self.feed_text(ctx, [tk.bos_id, tk.boi_id])
        self.feed_frame(ctx, latents, understanding)
        ids, _ = self.continue_text(ctx, self.feed_text(ctx, [tk.eoi_id]))
        return tk.decode(ids)
