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

Batches: a context of B rows (``new_context(batch=B)``) runs B sequences through every model
call together (captions, videos, the 120 candidate rollouts of a planner). Rows may hold
different numbers of positions: text fed in ragged lengths is padded at the end of the run,
and padding takes no position and is never attended to. A context made without ``batch`` is
one sequence whose tensors carry no batch dimension. ``SamplingConfig.kv_cache = False``
recomputes the whole context at every model call instead of reading the KV cache: the
reference the cache is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from unimm.data.batch import TEXT, VISION
from unimm.flow import FlowMatchingConfig, euler_step, time_grid
from unimm.model.attention import LayerKVCache
from unimm.model.transformer import UnimmModel


class ContextTooLong(ValueError):
    """A sequence would need more positions than the model's ``max_seq_len``."""


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    euler_steps: int = 25
    cfg_scale: float = 3.0
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy decoding."""
    kv_cache: bool = True
    """False: every model call recomputes the whole context (the cache's reference; slower)."""


class Context:
    """B sequences generated together: per-layer KV cache (or, without one, every committed
    run's model inputs), which of the held positions are real (``valid_BS``), their attention
    segments (a text token its own, a frame one for all its patches: a query sees the real
    keys of its own segment and earlier ones), and what the unconditional branch holds
    (``skeleton`` until ``uncond`` is built). ``length``: positions held per row, padding
    included; ``batched`` False: one sequence, tensors without the batch dimension."""

    def __init__(self, n_layers: int, *, batch: int = 1, batched: bool = False, kv_cache: bool = True,
                 device: torch.device | str = "cpu", track_uncond: bool = True):
        self.batch, self.batched, self.n_layers, self.device = batch, batched, n_layers, device
        self.caches = [LayerKVCache() for _ in range(n_layers)] if kv_cache else None
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.length = 0
        self.valid_BS = torch.ones(batch, 0, dtype=torch.bool, device=device)
        self.segment_BS = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.next_position_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.next_segment = 0
        # ("text", ids per row) / ("frame" | "understanding_frame", latents [B, N, C]) segments
        self.skeleton: list[tuple[str, object]] | None = [] if track_uncond else None
        self.uncond: Context | None = None
        self.conditioned = False  # condition text fed: the unconditional branch is no copy of this one

    def copy(self) -> Context:
        """A context holding what this one holds, tracking no unconditional branch. Cheap: the
        cache tensors are shared, and every later run extends a copy with new tensors."""
        other = self.twin()
        if self.caches is not None:
            for mine, theirs in zip(self.caches, other.caches):
                theirs.k, theirs.v = mine.k, mine.v
        other.inputs = list(self.inputs)
        other.length, other.valid_BS, other.segment_BS = self.length, self.valid_BS, self.segment_BS
        other.next_position_B, other.next_segment = self.next_position_B, self.next_segment
        return other

    def twin(self) -> Context:
        """An empty context of the same shape and kind that tracks no unconditional branch."""
        return Context(self.n_layers, batch=self.batch, batched=self.batched, kv_cache=self.caches is not None,
                       device=self.device, track_uncond=False)


def _rows(ctx: Context, ids: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids per row: a flat list goes to every row, a list of lists gives each row its own."""
    if len(ids) and isinstance(ids[0], (list, tuple)):
        if not ctx.batched or len(ids) != ctx.batch:
            raise ValueError(f"per-row ids need a batched context of {len(ids)} rows, this one has {ctx.batch}")
        return [[int(i) for i in row] for row in ids]
    return [[int(i) for i in ids] for _ in range(ctx.batch)]


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
        progress: Progress | None = None,
    ):
        self.model, self.tokenizer, self.flow, self.shift = model.eval(), tokenizer, flow, shift
        self.tokens_per_frame, self.config, self.generator = tokens_per_frame, config, generator
        self.progress = progress
        """Told of every Euler step (one per batch), e.g. a tqdm bar."""
        self.latent_dim = model.config.latent_dim
        self.understanding_dim = int(getattr(model.config, "understanding_dim", 0) or 0)
        self.max_seq_len = model.config.max_seq_len
        self.device = next(model.parameters()).device
        self._structural = {tokenizer.bos_id, tokenizer.boi_id, tokenizer.eoi_id}

    def new_context(self, batch: int | None = None) -> Context:
        """One sequence (tensors without a batch dimension), or ``batch`` rows."""
        if batch is not None and batch < 1:
            raise ValueError(f"a batch needs at least one row, got {batch}")
        return Context(len(self.model.layers), batch=batch or 1, batched=batch is not None,
                       kv_cache=self.config.kv_cache, device=self.device)

    # -- running the model on new positions ----------------------------------------------

    def _mask(self, key_valid_BK: torch.Tensor, key_segment_BK: torch.Tensor, queries: int) -> torch.Tensor:
        """[B, 1, queries, K] for the last ``queries`` keys as queries; each also sees itself,
        so a padding query has a key and no NaN."""
        K = key_segment_BK.shape[1]
        query_segment_BQ = key_segment_BK[:, K - queries:]
        mask = key_valid_BK[:, None, :] & (key_segment_BK[:, None, :] <= query_segment_BQ[:, :, None])
        diagonal = torch.arange(queries, device=mask.device)
        mask[:, diagonal, K - queries + diagonal] = True
        return mask[:, None]

    @torch.no_grad()
    def _run(self, ctx: Context, tokens, latents, t, modality: int, commit: bool, understanding=None,
             lengths: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of n new positions per row ([B, n, D]; [n, D] for one sequence): a run
        of text (causal among themselves) or one frame (bidirectional), all seeing the whole
        context. ``understanding``: the understanding latents [(B,) n, C_u] of a dual encoder's
        understanding frame. ``lengths`` [B]: real positions per row (text only; the rest is
        padding), default all n. ``segments`` [n] with ``modality`` [n]: a mixed run of text and
        clean frames, each position's attention segment counted from 0 (`feed_prefix`)."""
        if not ctx.batched:
            tokens, latents, t = tokens[None], latents[None], t[None]
            understanding = None if understanding is None else understanding[None]
        B, n = tokens.shape
        device = self.device
        steps = torch.arange(n, device=device)
        lengths_B = torch.full((B,), n, device=device) if lengths is None else lengths.to(device)
        needed = int((ctx.next_position_B + lengths_B).max())
        if needed > self.max_seq_len:
            raise ContextTooLong(f"the sequence needs {needed} positions, more than the model's max_seq_len {self.max_seq_len}")
        run = {
            "tokens": tokens.to(device),
            "latents": latents.to(device),
            "t": t.to(device),
            "modality": (torch.full((n,), modality, device=device) if segments is None else modality.to(device)).expand(B, n),
            # padding takes no position of its own: it is clamped into the table and never seen
            "positions": (ctx.next_position_B[:, None] + steps).clamp(max=self.max_seq_len - 1),
        }
        if self.understanding_dim:
            run["understanding"] = torch.full((B, n), understanding is not None, device=device)
            run["understanding_latents"] = (
                understanding.to(device) if understanding is not None
                else torch.zeros(B, n, self.understanding_dim, device=device)
            )
        valid_Bn = steps[None] < lengths_B[:, None]
        if segments is None:
            segments = steps if modality == TEXT else torch.zeros_like(steps)
        segment_Bn = (ctx.next_segment + segments.to(device)).expand(B, n)
        key_valid = torch.cat([ctx.valid_BS, valid_Bn], dim=1)
        key_segment = torch.cat([ctx.segment_BS, segment_Bn], dim=1)
        if ctx.caches is not None:
            for cache in ctx.caches:
                cache.commit = commit
            inputs, mask, caches = run, self._mask(key_valid, key_segment, n), ctx.caches
        else:
            inputs = {k: torch.cat([r[k] for r in ctx.inputs] + [run[k]], dim=1) for k in run}
            mask, caches = self._mask(key_valid, key_segment, key_segment.shape[1]), None
        extra = {}
        if self.understanding_dim and (understanding is not None or caches is None):
            extra = {"understanding_BL": inputs["understanding"], "understanding_latents_BLC": inputs["understanding_latents"]}
        h, _ = self.model.hidden_states(
            inputs["tokens"], inputs["latents"], inputs["t"], inputs["modality"], inputs["positions"], mask, caches, **extra,
        )
        h = h[:, -n:]
        if commit:
            ctx.length += n
            ctx.valid_BS, ctx.segment_BS = key_valid, key_segment
            ctx.next_position_B = ctx.next_position_B + lengths_B
            ctx.next_segment += int(segments.max()) + 1
            if ctx.caches is None:
                ctx.inputs.append(run)
        return h if ctx.batched else h[0]

    @torch.no_grad()
    def feed_text(self, ctx: Context, ids) -> torch.Tensor:
        """Append text (a list of ids for every row, or one list per row of a batch); return
        the logits after each row's last token ([V], or [B, V]; a row given no ids gets the
        logits at its first padding position, meaningless). Only ``<bos>``, ``<boi>`` and
        ``<eoi>`` reach the unconditional branch (the rest is condition)."""
        rows = _rows(ctx, ids)
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        n = int(lengths.max())
        tokens = torch.full((ctx.batch, n), self.tokenizer.pad_id, device=self.device)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row, device=self.device, dtype=tokens.dtype)
        latents = torch.zeros(ctx.batch, n, self.latent_dim, device=self.device)
        t = torch.ones(ctx.batch, n, device=self.device)
        if not ctx.batched:
            tokens, latents, t = tokens[0], latents[0], t[0]
        h = self._run(ctx, tokens, latents, t, TEXT, commit=True, lengths=lengths)
        if not ctx.batched:
            h = h[None]
        last_BD = h[torch.arange(ctx.batch, device=self.device), (lengths - 1).clamp(min=0)]
        structural = [[i for i in row if i in self._structural] for row in rows]
        ctx.conditioned |= any(len(a) != len(b) for a, b in zip(structural, rows))
        if any(structural):
            if ctx.uncond is not None:
                self.feed_text(ctx.uncond, structural if ctx.batched else structural[0])
            elif ctx.skeleton is not None:
                ctx.skeleton.append(("text", structural if ctx.batched else structural[0]))
        logits = self.model.lm_head(last_BD)
        return logits if ctx.batched else logits[0]

    def feed_frame(self, ctx: Context, latents: torch.Tensor, understanding: bool = False) -> None:
        """Append a clean frame ([N, C], or [B, N, C]) as context (to the unconditional branch
        as well); ``understanding``: a dual encoder's understanding latents [(B,) N_u, C_u]."""
        n = latents.shape[-2]
        lead = latents.shape[:-2]
        ones = torch.ones(*lead, n, device=self.device)
        if understanding:
            zeros = torch.zeros(*lead, n, self.latent_dim, device=self.device)
            self._run(ctx, self._pad_tokens(n, lead), zeros, ones, VISION, commit=True, understanding=latents)
        else:
            self._run(ctx, self._pad_tokens(n, lead), latents, ones, VISION, commit=True)
        if ctx.uncond is not None:
            self.feed_frame(ctx.uncond, latents, understanding)
        elif ctx.skeleton is not None:
            ctx.skeleton.append(("understanding_frame" if understanding else "frame", latents))

    @torch.no_grad()
    def feed_prefix(self, ctx: Context, parts: Sequence[list[int] | torch.Tensor]) -> None:
        """Text ids (the same for every row) and clean frames ([N, C], or [B, N, C]), in order,
        in one model call: what feeding them one by one computes, in one pass over the cache."""
        lead = (ctx.batch,) if ctx.batched else ()
        tokens, latents, modality, segments, segment = [], [], [], [], 0
        for part in parts:
            if isinstance(part, torch.Tensor):
                n = part.shape[-2]
                tokens.append(self._pad_tokens(n, lead))
                latents.append(part.to(self.device).expand(*lead, n, self.latent_dim))
                modality.append(torch.full((n,), VISION))
                segments.append(torch.full((n,), segment))
                segment += 1
            else:
                ids = torch.tensor(part, device=self.device, dtype=torch.long)
                tokens.append(ids.expand(*lead, len(part)))
                latents.append(torch.zeros(*lead, len(part), self.latent_dim, device=self.device))
                modality.append(torch.full((len(part),), TEXT))
                segments.append(segment + torch.arange(len(part)))
                segment += len(part)
                ctx.conditioned |= any(i not in self._structural for i in part)
        tokens_n, latents_n = torch.cat(tokens, dim=-1), torch.cat(latents, dim=-2)
        t = torch.ones(tokens_n.shape, device=self.device)
        self._run(ctx, tokens_n, latents_n, t, torch.cat(modality), commit=True, segments=torch.cat(segments))
        skeleton = [p if isinstance(p, torch.Tensor) else [i for i in p if i in self._structural] for p in parts]
        skeleton = [p for p in skeleton if isinstance(p, torch.Tensor) or p]
        if ctx.uncond is not None:
            self.feed_prefix(ctx.uncond, skeleton)
        elif ctx.skeleton is not None:
            for p in skeleton:
                if isinstance(p, torch.Tensor):
                    ctx.skeleton.append(("frame", p))
                else:
                    ctx.skeleton.append(("text", [list(p) for _ in range(ctx.batch)] if ctx.batched else list(p)))

    def _pad_tokens(self, n: int | None = None, lead: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        return torch.full((*lead, n or self.tokens_per_frame), self.tokenizer.pad_id, device=self.device)

    def unconditional(self, ctx: Context) -> Context:
        """The unconditional twin of ``ctx``: its frames and structural tokens, in order."""
        if ctx.uncond is None:
            if ctx.skeleton is None:
                raise ValueError("this context does not track an unconditional branch")
            uncond = ctx.twin()
            text: list | None = None
            for kind, segment in ctx.skeleton:
                if kind == "text":
                    text = segment if text is None else _join(text, segment, ctx.batched)
                    continue
                if text is not None:
                    self.feed_text(uncond, text)
                    text = None
                self.feed_frame(uncond, segment, understanding=kind == "understanding_frame")
            if text is not None:
                self.feed_text(uncond, text)
            ctx.uncond, ctx.skeleton = uncond, None
        return ctx.uncond

    def branch_unconditional(self, ctx: Context) -> None:
        """Before condition text is fed, the unconditional twin is a copy of ``ctx``: take it
        now and keep it in step, instead of recomputing its positions later (an action's
        context frames are prefilled once for both branches)."""
        if ctx.skeleton is not None and ctx.uncond is None and not ctx.conditioned:
            ctx.uncond, ctx.skeleton = ctx.copy(), None

    # -- images ---------------------------------------------------------------------------

    @torch.no_grad()
    def _prediction(self, ctx: Context, z: torch.Tensor, t: float) -> torch.Tensor:
        """The flow head's output (velocity or clean latent, as trained) for frame ``z`` at t."""
        lead = z.shape[:-2]
        t_N = torch.full((*lead, self.tokens_per_frame), t, device=self.device)
        h = self._run(ctx, self._pad_tokens(None, lead), z, t_N, VISION, commit=False)
        return self.model.flow_head(h).float()

    def denoise_frame(self, cond: Context, uncond: Context | None = None) -> torch.Tensor:
        """Euler integration of the flow from noise (t = 0) to a clean frame (t = 1), on the
        training's shifted time grid; both contexts must end with ``<boi>``. ``uncond``
        defaults to ``cond``'s unconditional twin (no guidance when ``cfg_scale`` is 1).
        Returns [N, C], or [B, N, C] for a batched context; row b starts from the b-th noise
        frame drawn, so a batch gives what its rows give one after another.

        Guidance combines the head outputs, pred = u + s * (c - u): for v-prediction that
        is the guided velocity; for x-prediction the velocity (x - z) / (1 - t) is affine
        in x, so it is the same guided velocity, and the last step lands on the guided x."""
        guided = self.config.cfg_scale != 1.0
        if guided and uncond is None:
            uncond = self.unconditional(cond)
        # row by row: the noise of a row does not depend on the batch size, so a batch gives
        # the frames its rows would give one after another (torch draws larger tensors otherwise)
        shape = (self.tokens_per_frame, self.latent_dim)
        z = torch.stack([torch.randn(shape, generator=self.generator, device=self.device) for _ in range(cond.batch)])
        if not cond.batched:
            z = z[0]
        grid = time_grid(self.config.euler_steps, self.shift)
        for t, t_next in zip(grid[:-1], grid[1:]):
            pred = self._prediction(cond, z, t)
            if guided:
                pred_uncond = self._prediction(uncond, z, t)
                pred = pred_uncond + self.config.cfg_scale * (pred - pred_uncond)
            z = euler_step(pred, z, t, t_next, self.flow)
            if self.progress is not None:
                self.progress.update(1)
        return z

    def text_to_image(self, caption: str) -> torch.Tensor:
        """Latents [N, C] of an image generated for ``caption`` (the T->I layout of training)."""
        return self._text_to_image(self.new_context(), [self.tokenizer.encode(caption)])

    def text_to_images(self, captions: Sequence[str]) -> torch.Tensor:
        """Latents [B, N, C], one image per caption, generated as one batch."""
        return self._text_to_image(self.new_context(len(captions)), [self.tokenizer.encode(c) for c in captions])

    def _text_to_image(self, ctx: Context, captions: list[list[int]]) -> torch.Tensor:
        tk = self.tokenizer
        rows = [[tk.bos_id, *ids, tk.boi_id] for ids in captions]
        self.feed_text(ctx, rows if ctx.batched else rows[0])
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

    def generate_video(self, caption: str, num_frames: int, context: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Frames [N, C] of a video for ``caption`` (the video layout of training), each
        guided against the earlier frames without the caption; ``context``: the video's first
        frames, given (clean), which the generated frames continue."""
        ctx = self.new_context()
        self._video_prefix(ctx, [self.tokenizer.encode(caption)], list(context))
        return self._generate_frames(ctx, num_frames)

    def generate_videos(self, captions: Sequence[str], num_frames: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_frames, N, C]: one video per caption, as one batch; ``context`` [B, K, N, C]:
        each video's first K frames, given, which its generated frames continue."""
        ctx = self.new_context(len(captions))
        frames = [] if context is None else list(context.to(self.device).unbind(1))
        self._video_prefix(ctx, [self.tokenizer.encode(c) for c in captions], frames)
        return torch.stack(self._generate_frames(ctx, num_frames), dim=1)

    def _video_prefix(self, ctx: Context, captions: list[list[int]], frames: list[torch.Tensor]) -> None:
        """``<bos> caption <boi>`` and, per given frame, ``frame <eoi> <boi>``."""
        tk = self.tokenizer
        rows = [[tk.bos_id, *ids, tk.boi_id] for ids in captions]
        self.feed_text(ctx, rows if ctx.batched else rows[0])
        for frame in frames:
            self.feed_frame(ctx, frame)
            self.feed_text(ctx, [tk.eoi_id, tk.boi_id])

    def predict_frames(self, context: list[torch.Tensor], action: str, num_frames: int = 1) -> list[torch.Tensor]:
        """Frames that follow ``context`` frames under ``action`` (the action layout of
        training: NWM's 4 context frames and 1 target, annotated video's 1-4 and 1-4),
        guided against the context frames without the action."""
        ctx = self.new_context()
        self._action_prefix(ctx, context, [self.tokenizer.encode(action)])
        return self._generate_frames(ctx, num_frames)

    def predict_next(self, context: torch.Tensor, actions: Sequence[str]) -> torch.Tensor:
        """[B, N, C]: for each row, the frame after its context frames [B, K, N, C] under its
        action text (NWM's layout, one target), all rows as one batch."""
        if len(actions) != context.shape[0]:
            raise ValueError(f"{len(actions)} actions for {context.shape[0]} contexts")
        ctx = self.new_context(len(actions))
        self._action_prefix(ctx, list(context.to(self.device).unbind(1)), [self.tokenizer.encode(a) for a in actions])
        return self._generate_frames(ctx, 1)[0]

    def _action_prefix(self, ctx: Context, frames: list[torch.Tensor], actions: list[list[int]]) -> None:
        """``<bos>``, per context frame ``<boi> frame <eoi>``, then ``action <boi>``."""
        tk = self.tokenizer
        parts: list = [[tk.bos_id]]
        for frame in frames:
            parts += [[tk.boi_id], frame, [tk.eoi_id]]
        self.feed_prefix(ctx, parts)
        self.branch_unconditional(ctx)
        rows = [[*ids, tk.boi_id] for ids in actions]
        self.feed_text(ctx, rows if ctx.batched else rows[0])

    # -- text -----------------------------------------------------------------------------

    def _pick(self, logits: torch.Tensor) -> int:
        if self.config.temperature <= 0:
            return int(logits.argmax())
        probs = (logits.float() / self.config.temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def continue_text(self, ctx: Context, logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """Generate until ``<eos>`` or ``max_new_tokens``; frames are generated whenever the
        model emits ``<boi>``. Returns the new token ids and the generated frames. One
        sequence: rows of a batch could switch between text and frames at different steps."""
        if ctx.batched:
            raise ValueError("continue_text generates one sequence at a time: use a context made without batch")
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

    def complete_text(self, prompt: str) -> tuple[str, list[torch.Tensor]]:
        """``<bos> prompt`` continued: the new text (``<boi>``/``<eoi>`` included where the model
        drew an image) and the frames it drew."""
        tk = self.tokenizer
        ctx = self.new_context()
        ids, frames = self.continue_text(ctx, self.feed_text(ctx, [tk.bos_id, *tk.encode(prompt)]))
        return tk.decode(ids), frames

    def image_to_text(self, latents: torch.Tensor, understanding: bool | None = None) -> str:
        """Caption of a frame (the I->T layout of training: <bos> <boi> image <eoi> caption).
        ``understanding`` (default: whether the model is a dual encoder): ``latents`` are the
        understanding encoder's, read through ``understanding_proj``."""
        if understanding is None:
            understanding = bool(self.understanding_dim)
        tk = self.tokenizer
        ctx = self.new_context()
        self.feed_text(ctx, [tk.bos_id, tk.boi_id])
        self.feed_frame(ctx, latents, understanding)
        ids, _ = self.continue_text(ctx, self.feed_text(ctx, [tk.eoi_id]))
        return tk.decode(ids)


def _join(a, b, batched: bool):
    """Two ids segments one after the other, row by row when batched."""
    return [x + y for x, y in zip(a, b)] if batched else a + b
