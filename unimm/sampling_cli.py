"""``unimm sample``: look at what a run has learnt, one task at a time or several.

Tasks (``--task``, repeatable; default t2i and i2t):

- ``t2i``: one image per ``--prompt`` (25-step Euler with guidance), prompts batched;
- ``i2t``: captions of the first images of the run's own image-to-text shards (the sources
  chosen by what the manifest says about them, `captioning_sources`, whatever their names);
- ``text``: ``<bos> prompt`` continued (images drawn where the model opens one);
- ``video``: one video per ``--prompt`` and continuations of the run's own videos from their
  first ``--context-frames`` frames, frame by frame, each frame guided against the earlier
  frames without the caption;
- ``rollout``: world-model rollouts (`unimm.world_model.rollout`): the context frames of
  held-out navigation episodes, then ``--frames`` frames under WASD keys (``--keys``) or a
  text action (``--action``, numeric as the data jobs write it or free-form); a PNG strip and a
  GIF per rollout;
- ``plan``: CEM planning over an episode file against random action sequences, ATE and RPE
  (`unimm.world_model.evaluate`).

Writes to RUN/samples (or --out): samples.json (every task's results), samples.png (t2i and
i2t), video.png, rollout.png with rollout_E_R.png/.gif, plan_eval.json/.png; ``--json``
prints samples.json. Further --section.key VALUE options are the run's torchtitan config
overrides (give the same ones as to unimm train, e.g. --dataloader.shards DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from unimm.errors import ConfigError

TASKS = ("text", "t2i", "i2t", "video", "rollout", "plan")
DEFAULT_TASKS = ("t2i", "i2t")
DEFAULT_PROMPTS = ("a red circle", "a blue square", "a yellow triangle and a green diamond", "a purple star")
DEFAULT_KEYS = ("WWWWWWWW", "AAAAAAAA", "DDDDDDDD", "SSSSSSSS")
DEFAULT_VIDEO_FRAMES = 4  # the procedural videos' length
DEFAULT_ROLLOUT_FRAMES = 8  # paper §5.3: 4 context frames, 8 predicted

DESCRIPTION = __doc__.split("\n", 2)[2].replace("``", "").replace("`", "")


def captioning_sources(info: dict[str, Any]) -> list[str]:
    """The sources of a manifest (`manifest.json` as a dict) to caption images from.

    Chosen by `source_info` (written by every data job: kind, directions), not by name:
    image_text sources trained image -> text (direction i2t; no directions recorded means
    both, as the loader reads it), in manifest order; if there is none, the image_text
    sources trained only text -> image (their texts describe their images too)."""
    source_info = info.get("source_info") or {}
    pairs = [name for name in info.get("sources", {}) if (source_info.get(name) or {}).get("kind") == "image_text"]
    understanding = [n for n in pairs if "i2t" in (source_info[n].get("directions") or ["i2t", "t2i"])]
    return understanding or pairs


def _sources_of_kind(info: dict[str, Any], kind: str) -> list[str]:
    source_info = info.get("source_info") or {}
    return [name for name in info.get("sources", {}) if (source_info.get(name) or {}).get("kind") == kind]


def _round_robin(streams: Iterable[Iterator]) -> Iterator:
    """One item of each stream in turn, so a few captions still cover every source."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


def latest_checkpoint(run: Path, step: int | None) -> Path:
    folder = run / "checkpoint"
    steps = sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / ".metadata").is_file())
    if not steps:
        raise ConfigError(f"{folder}: no complete checkpoint (step-N with .metadata)")
    if step is not None and step not in steps:
        raise ConfigError(f"{folder}: no checkpoint step-{step}; there are steps {steps}")
    return folder / f"step-{step if step is not None else steps[-1]}"


# -- the run: model, sampler, encoder ----------------------------------------------------------


@dataclass
class LoadedRun:
    sampler: Any  # unimm.sampling.MixedModalSampler
    encoder: Any  # the manifest's encoder (with --decoder, a semantic one decodes)
    normalizer: Any  # the manifest's latent statistics, or None when the run reads raw latents
    manifest: Any
    config: Any
    checkpoint: Path
    recipe: str

    def describe(self) -> dict[str, Any]:
        return {"run": str(self.checkpoint.parent.parent), "recipe": self.recipe, "checkpoint": self.checkpoint.name}

    def no_decoder_note(self) -> str | None:
        """Why generated latents cannot be shown as pixels (None: they can)."""
        if getattr(self.encoder, "decode", None) is not None:
            return None
        name = (self.manifest.info.get("encoder") or {}).get("name", "none")
        return f"no decoder for encoder {name}: pass --decoder PATH (an RAE decoder, data_pipelines/train_rae_decoder.py)"

    def to_pixels(self, latents: np.ndarray) -> np.ndarray | None:
        """uint8 [..., S, S, 3] of latents [..., N, C] as the model reads them; None without a decoder."""
        decode = getattr(self.encoder, "decode", None)
        if decode is None:
            return None
        if self.normalizer is not None:
            latents = self.normalizer.denormalize(latents)
        lead = latents.shape[:-2]
        pixels = decode(latents.reshape(-1, *latents.shape[-2:]))
        return pixels.reshape(*lead, *pixels.shape[1:])

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Latents as the model reads them of uint8 frames [..., S, S, 3]."""
        latents = self.encoder.encode(frames)
        if self.normalizer is not None:
            latents = self.normalizer.normalize(latents)
        return torch.from_numpy(np.asarray(latents, dtype=np.float32))


def _check_architecture(checkpoint: Path, model_config, recipe: str) -> None:
    from unimm.convert.architecture import checkpoint_differences

    shown = checkpoint_differences(checkpoint, model_config)
    if shown:
        raise ConfigError(
            f"{checkpoint} holds another architecture than recipe {recipe!r}'s model: {shown}. Pass the recipe and "
            "the --section.key options the run was trained with (RUN/run.json records them)"
        )


def load_run(args: argparse.Namespace) -> LoadedRun:
    """The run's model at its latest (or ``args.step``) checkpoint, in a sampler; its encoder."""
    from unimm.convert.dcp_io import DcpCheckpoint
    from unimm.data_pipelines.encoders import EncoderSpec, load_encoder
    from unimm.sampling import MixedModalSampler, SamplingConfig
    from unimm.titan.launch import load_recipe, preflight

    if args.euler_steps < 1:
        raise ConfigError(f"--euler-steps must be >= 1, got {args.euler_steps}")
    config = load_recipe(args.recipe, args.config_overrides)
    manifest = preflight(config)
    model_config = config.model_spec.model
    checkpoint = latest_checkpoint(Path(args.run), args.step)
    _check_architecture(checkpoint, model_config, args.recipe)
    model = model_config.build()
    expected = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in DcpCheckpoint(checkpoint).load().items() if k in expected})
    tokenizer = config.tokenizer.build()
    sampler = MixedModalSampler(
        model,
        tokenizer,
        config.loss.flow,
        config.loss.flow.shift_factor(manifest.tokens_per_frame, model_config.latent_dim),
        manifest.tokens_per_frame,
        SamplingConfig(euler_steps=args.euler_steps, cfg_scale=args.cfg_scale),
        generator=torch.Generator().manual_seed(args.seed),
    )
    encoder = None
    if manifest.info.get("encoder"):
        spec = EncoderSpec(**manifest.info["encoder"])
        if getattr(args, "decoder", None):
            spec = dataclasses.replace(spec, decoder=args.decoder)
        encoder = load_encoder(spec)
    normalizer = manifest.normalizer if config.dataloader.normalize_latents else None
    return LoadedRun(sampler, encoder, normalizer, manifest, config, checkpoint, args.recipe)


def _caption_images(run: LoadedRun, count: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(source, the text the sample trains after its image (its stored ids), its frame's
    latents (shown), the latents the model reads to caption it (a dual encoder's understanding
    latents)) for the first ``count`` images, one source after another."""
    from unimm.data.shards import SampleSpec, read_samples

    manifest, tokenizer = run.manifest, run.sampler.tokenizer
    understanding = None
    if run.sampler.understanding_dim:  # dual encoder: captions read the understanding latents
        u = manifest.understanding
        understanding = SampleSpec(u.tokens_per_frame, u.latent_dim, tokenizer.get_vocab_size(), u.normalizer)
    spec = SampleSpec(
        manifest.tokens_per_frame, manifest.latent_dim, tokenizer.get_vocab_size(), run.normalizer,
        understanding=understanding,
    )
    streams = [
        ((name, s) for s in read_samples(manifest.sources[name], spec)) for name in captioning_sources(manifest.info)
    ]
    return [
        (name, tokenizer.decode(s["tokens"].tolist()), s["latents"][0], s.get("understanding_latents", s["latents"])[0])
        for name, s in islice(_round_robin(streams), count)
    ]


def _load_sampler(args: argparse.Namespace):
    """(sampler, encoder, normalizer, images to caption) of a run (tools/demo_targets.py)."""
    run = load_run(args)
    return run.sampler, run.encoder, run.normalizer, _caption_images(run, args.caption_images)


# -- checks before generating ------------------------------------------------------------------


def _check_fits(run: LoadedRun, what: str, text: str, extra: int, description: str) -> None:
    """A clear error when ``text``'s tokens plus ``extra`` positions exceed the model's context."""
    tokens = len(run.sampler.tokenizer.encode(text))
    limit = run.sampler.max_seq_len
    if tokens + extra > limit:
        raise ConfigError(
            f"{what} {text if len(text) <= 60 else text[:57] + '...'!r} is {tokens} tokens: with {description} the sequence needs "
            f"{tokens + extra} positions, more than the model's max_seq_len {limit}"
        )


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(args: argparse.Namespace, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=args.no_progress)


# -- tasks -------------------------------------------------------------------------------------


def _task_t2i(run: LoadedRun, args, out: Path, figures: dict) -> list[dict]:
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    n = run.sampler.tokens_per_frame
    for p in prompts:
        _check_fits(run, "--prompt", p, n + 2, f"<bos>, <boi> and a {n}-token image")
    run.sampler.progress = bar = _progress(args, len(list(_batches(prompts, args.batch_size))) * args.euler_steps, "t2i")
    latents = [z for batch in _batches(prompts, args.batch_size) for z in run.sampler.text_to_images(batch).cpu().numpy()]
    bar.close()
    figures["t2i"] = list(zip(prompts, latents))
    for i, z in enumerate(latents):
        np.save(out / f"generated_{i}.npy", z)
    return [{"prompt": p, "latents": f"generated_{i}.npy"} for i, p in enumerate(prompts)]


def _task_i2t(run: LoadedRun, args, out: Path, figures: dict) -> list[dict]:
    captioned = [
        (source, truth, run.sampler.image_to_text(torch.from_numpy(read)), latents)
        for source, truth, latents, read in _caption_images(run, args.caption_images)
    ]
    figures["i2t"] = captioned
    return [{"source": source, "truth": truth, "generated": text} for source, truth, text, _ in captioned]


def _task_text(run: LoadedRun, args, out: Path, figures: dict) -> list[dict]:
    results = []
    for i, prompt in enumerate(args.prompt or DEFAULT_PROMPTS):
        _check_fits(run, "--prompt", prompt, 1, "<bos>")
        text, frames = run.sampler.complete_text(prompt)
        names = []
        for j, frame in enumerate(frames):
            names.append(f"text_{i}_frame_{j}.npy")
            np.save(out / names[-1], frame.cpu().numpy())
        results.append({"prompt": prompt, "completion": text, "frames": names})
    return results


def _videos_from_shards(run: LoadedRun, count: int, context: int) -> list[tuple[str, str, np.ndarray]]:
    """(source, caption, its first ``context`` frames) of the first ``count`` videos of the run."""
    from unimm.data.shards import SampleSpec, read_samples

    manifest, tokenizer = run.manifest, run.sampler.tokenizer
    spec = SampleSpec(manifest.tokens_per_frame, manifest.latent_dim, tokenizer.get_vocab_size(), run.normalizer)
    streams = [((name, s) for s in read_samples(manifest.sources[name], spec)) for name in _sources_of_kind(manifest.info, "video")]
    return [
        (name, tokenizer.decode(s["tokens"].tolist()), s["latents"][:context])
        for name, s in islice(_round_robin(streams), count) if len(s["latents"]) > context
    ]


def _task_video(run: LoadedRun, args, out: Path, figures: dict) -> list[dict]:
    frames = args.frames or DEFAULT_VIDEO_FRAMES
    n = run.sampler.tokens_per_frame
    prompts = [(p, None, None) for p in (args.prompt or DEFAULT_PROMPTS)]
    given = _videos_from_shards(run, args.videos, args.context_frames) if args.context_frames else []
    jobs = prompts + [(caption, source, context) for source, caption, context in given]
    for caption, _, context in jobs:
        k = 0 if context is None else len(context)
        _check_fits(run, "the caption" if context is not None else "--prompt", caption, 2 + (k + frames) * (n + 2) - 1,
                    f"<bos> and {k + frames} frames of {n} tokens with <boi>/<eoi>")
    groups = [[j for j in jobs if j[2] is None]] + [[j] for j in jobs if j[2] is not None]
    batches = [b for group in groups for b in _batches(group, args.batch_size) if b]
    run.sampler.progress = bar = _progress(args, len(batches) * frames * args.euler_steps, "video")
    results, rows = [], []
    for batch in batches:
        context = None if batch[0][2] is None else torch.from_numpy(np.stack([j[2] for j in batch]))
        videos = run.sampler.generate_videos([j[0] for j in batch], frames, context).cpu().numpy()
        for (caption, source, given_frames), video in zip(batch, videos):
            i = len(results)
            k = 0 if given_frames is None else len(given_frames)
            whole = video if given_frames is None else np.concatenate([given_frames, video])
            np.save(out / f"video_{i}.npy", whole)
            results.append({"caption": caption, "source": source, "context_frames": k, "generated_frames": frames,
                            "latents": f"video_{i}.npy"})
            titles = [f"given {t + 1}" for t in range(k)] + [f"frame {k + t + 1}" for t in range(frames)]
            rows.append((textwrap.fill(textwrap.shorten(caption, 40), 20), run.to_pixels(whole), titles))
    bar.close()
    from unimm.world_model.visuals import save_grid

    save_grid(out / "video.png", rows, note=run.no_decoder_note())
    return results


def _rollout_rows(args, frames: int) -> list[tuple[str, list]]:
    """(label, one action per frame) per rollout row, from --keys and --action."""
    from unimm.world_model.actions import parse_action, wasd_actions

    rows = []
    for keys in args.keys or ([] if args.action else DEFAULT_KEYS):
        try:
            actions = wasd_actions(keys)
        except ValueError as exc:
            raise ConfigError(f"--keys {keys!r}: {exc}") from exc
        if len(actions) == 1:
            actions = actions * frames
        if len(actions) != frames:
            raise ConfigError(f"--keys {keys!r} gives {len(actions)} actions for --frames {frames}: give one key or {frames}")
        rows.append((f"keys {keys}", actions))
    for text in args.action or []:
        try:
            action = parse_action(text)
        except ValueError as exc:
            raise ConfigError(f"--action: {exc}") from exc
        rows.append((f"action {text!r}", [action] * frames))
    return rows


def _task_rollout(run: LoadedRun, args, out: Path, figures: dict) -> list[dict]:
    from unimm.data_pipelines import navigation
    from unimm.world_model.actions import format_action
    from unimm.world_model.evaluate import ROLLOUT_EPISODES
    from unimm.world_model.rollout import RolloutConfig, rollout
    from unimm.world_model.visuals import save_gif, save_grid, save_strip

    frames = args.frames or DEFAULT_ROLLOUT_FRAMES
    rows = _rollout_rows(args, frames)
    n, K = run.sampler.tokens_per_frame, RolloutConfig.num_context
    for label, actions in rows:
        longest = max((format_action(a) for a in actions), key=lambda t: len(run.sampler.tokenizer.encode(t)))
        _check_fits(run, label.split()[0], longest, 2 + (K + 1) * (n + 2) - 1,
                    f"<bos>, {K} context frames and the target of {n} tokens with <boi>/<eoi>")
    count = ROLLOUT_EPISODES if args.count is None else args.count
    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")
    if args.episodes is not None:
        episodes = navigation.read_episodes(args.episodes)[:count]
    else:
        episodes = [navigation.planning_episode(i, image_size=run.encoder.image_size) for i in range(count)]
    jobs = [(e, label, actions) for e, episode in enumerate(episodes) for label, actions in rows]
    run.sampler.progress = bar = _progress(args, len(list(_batches(jobs, args.batch_size))) * frames * args.euler_steps, "rollout")
    results, grid, note = [], [], run.no_decoder_note()
    for batch in _batches(jobs, args.batch_size):
        context = torch.stack([run.encode(episodes[e].context_frames) for e, _, _ in batch])
        predicted = rollout(run.sampler, context, [actions for _, _, actions in batch], K).cpu().numpy()
        for (e, label, actions), frames_HNC in zip(batch, predicted):
            episode, r = episodes[e], len(results)
            name = f"rollout_{e}_{r}"
            texts = [format_action(a) for a in actions]
            np.save(out / f"{name}.npy", frames_HNC)
            pixels = run.to_pixels(frames_HNC)
            strip = None if pixels is None else np.concatenate([episode.context_frames, pixels])
            titles = [f"ctx{k}" for k in range(len(episode.context_frames))] + [
                f"p{h + 1}\n{textwrap.fill(t, 14, max_lines=3, placeholder=' ...')}" for h, t in enumerate(texts)
            ]
            save_strip(out / f"{name}.png", strip, titles, f"episode {episode.index}, {label}", note)
            if strip is not None:
                save_gif(out / f"{name}.gif", strip)
            grid.append((f"ep {episode.index}\n{label}", strip, titles))
            results.append({"episode": episode.index, "world_seed": episode.world_seed, "label": label, "actions": texts,
                            "latents": f"{name}.npy", "png": f"{name}.png",
                            "gif": None if strip is None else f"{name}.gif"})
    bar.close()
    save_grid(out / "rollout.png", grid, note=note)
    return results


def _task_plan(run: LoadedRun, args, out: Path, figures: dict) -> dict:
    from unimm.world_model.evaluate import evaluate_planning, load_episodes, settings_from, summary, training_seed

    settings = settings_from(args)
    episodes, path = load_episodes(args, run.encoder.image_size, out)
    report = evaluate_planning(run.sampler, run.encoder, run.normalizer, episodes, settings, out, episodes_path=path,
                               training_seed=training_seed(run.config), extra=run.describe(), progress=not args.no_progress)
    if not args.json:
        print(summary(report))
    return {"report": "plan_eval.json", "png": "plan_eval.png", "distance": report["distance"], "mean": report["mean"],
            "cem_beats_random": report["cem_beats_random"]}


TASK_RUNNERS = {"text": _task_text, "t2i": _task_t2i, "i2t": _task_i2t, "video": _task_video,
                "rollout": _task_rollout, "plan": _task_plan}


def _clipped(text: str) -> str:
    """A plot title's share of a long text, in two lines at most (samples.json keeps it whole)."""
    return textwrap.fill(textwrap.shorten(text, 64, placeholder=" ...") or text[:60], 34)


def _samples_png(run: LoadedRun, figures: dict, path: Path) -> None:
    """Generated images over their prompts, captioned images under their truth and the model's text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generated, captioned = figures.get("t2i", []), figures.get("i2t", [])
    note = run.no_decoder_note()
    columns = max(len(generated), len(captioned), 1)
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (prompt, latents) in zip(axes[0], generated):
        pixels = run.to_pixels(latents)
        if pixels is not None:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"generated:\n{prompt}", fontsize=8)
    for ax, (source, truth, text, latents) in zip(axes[1], captioned):
        pixels = run.to_pixels(latents)
        if pixels is not None:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"{source}\ntruth: {_clipped(truth)}\nmodel: {_clipped(text)}", fontsize=7)
    if note:
        fig.suptitle(textwrap.fill(note, 100), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sample(args: argparse.Namespace) -> int:
    tasks = list(dict.fromkeys(args.task or DEFAULT_TASKS))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown --task {unknown[0]!r}: expected one of {', '.join(TASKS)}")
    for name in ("caption_images", "videos", "context_frames"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    run = load_run(args)
    if {"rollout", "plan", "video", "t2i"} & set(tasks) and run.encoder is None:
        raise ConfigError("the run's manifest records no visual encoder: it has no frames to generate or read")
    note = run.no_decoder_note()
    if note and {"t2i", "i2t", "video", "rollout"} & set(tasks):
        print(f"unimm: {note}; images are left empty", file=sys.stderr)
    out = Path(args.out or Path(args.run) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    report: dict[str, Any] = {**run.describe(), "tasks": tasks, "decoder_note": note}
    keys = {"t2i": "text_to_image", "i2t": "image_to_text"}
    for task in tasks:
        report[keys.get(task, task)] = TASK_RUNNERS[task](run, args, out, figures)
    (out / "samples.json").write_text(json.dumps(report, indent=2))
    written = ["samples.json"]
    if figures:
        _samples_png(run, figures, out / "samples.png")
        written.append("samples.png")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"unimm: {', '.join(tasks)}: results in {out} ({', '.join(written)} and the tasks' own files)")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Which run, which checkpoint, and how to sample from it (shared with the planning tool)."""
    parser.add_argument("--run", required=True, metavar="DIR", help="run folder (holds checkpoint/step-N)")
    parser.add_argument("--recipe", required=True, metavar="NAME", help="the recipe the run was trained with")
    parser.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--euler-steps", type=int, default=25, metavar="N",
        help="Euler steps of the flow sampler per generated frame (default: 25)",
    )
    parser.add_argument(
        "--cfg-scale", type=float, default=3.0, metavar="W",
        help="classifier-free guidance weight; 1.0 turns guidance off (default: 3.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated frames' noise and of the plans; text is greedy (default: 0)")
    parser.add_argument("--decoder", default=None, metavar="DIR",
                        help="RAE decoder folder for a semantic encoder's latents (data_pipelines/train_rae_decoder.py)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/samples)")


def register(verbs: argparse._SubParsersAction) -> None:
    from unimm.world_model.evaluate import add_planning_arguments

    sample = verbs.add_parser(
        "sample",
        help="generate with a trained run: images, captions, text, videos, world-model rollouts, plans",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(sample)
    sample.add_argument(
        "--task", action="append", choices=TASKS, metavar="TASK",
        help=f"what to generate, repeatable: {', '.join(TASKS)} (default: {' and '.join(DEFAULT_TASKS)})",
    )
    sample.add_argument(
        "--prompt", action="append", metavar="TEXT",
        help=f"caption (t2i, video) or text to continue (text); repeat for several (default: {len(DEFAULT_PROMPTS)} built-in shape captions)",
    )
    sample.add_argument(
        "--caption-images", type=int, default=4, metavar="N",
        help="images from the run's image-to-text shards to caption, i2t (default: 4)",
    )
    sample.add_argument("--frames", type=int, default=None, metavar="N",
                        help=f"frames to generate per video ({DEFAULT_VIDEO_FRAMES}) or rollout ({DEFAULT_ROLLOUT_FRAMES})")
    sample.add_argument("--videos", type=int, default=2, metavar="N", help="videos of the run's shards to continue (video; default: 2)")
    sample.add_argument("--context-frames", type=int, default=1, metavar="K",
                        help="given frames each continued video starts from; 0: no continuations (default: 1)")
    sample.add_argument("--keys", action="append", metavar="WASD",
                        help="rollout actions as WASD keys, one per frame or one for all, e.g. WWAD... (repeatable; default: WWWWWWWW, AAAAAAAA, DDDDDDDD, SSSSSSSS)")
    sample.add_argument("--action", action="append", metavar="TEXT",
                        help="a rollout action for every frame: numeric as the data jobs write it ('dx +0.50 dy +0.00 dyaw +0.00') or free-form text (repeatable)")
    sample.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts, videos or rollouts generated together (default: 8)")
    add_planning_arguments(sample)
    sample.add_argument("--json", action="store_true", help="print samples.json to stdout")
    sample.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")
    sample.set_defaults(func=_sample, takes_overrides=True)
