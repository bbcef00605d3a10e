"""Combine job folders into one mixture: a manifest.json that lists all their sources.

    python -m unimm.data_pipelines.mix --out DIR FOLDER [FOLDER ...]

Each FOLDER holds a manifest.json (one job's output, or another mixture). The mixture lists
every source's shards by paths relative to DIR, so DIR is usually the parent of the job
folders and the whole tree can be moved as one. The parts must agree on the tokenizer (shards
hold token ids) and, where they hold latents, on the encoder and the latent shape; the
normalisation statistics are pooled over all visual sources from their exact sums. The
loader's `source_weights` then name the sources (e.g. dclm, video, metaclip, sstk, nwm).

Dual-encoder parts (image-text folders written with an understanding encoder) must agree on
that encoder too; the mixture's ``understanding`` entry pools their statistics, and each
source's ``source_info`` says whether it has understanding latents (``understanding_encoder``).
Parts without them (text, video, action, single-encoder image-text) mix in unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from unimm.data.latent_stats import ChannelStats
from unimm.data.shards import MANIFEST_FORMAT
from unimm.data_pipelines.encoders import without_decoder
from unimm.data_pipelines.shard_job import LATENT_DTYPE, write_json
from unimm.errors import ConfigError


def _read(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no manifest.json (is the job finished?)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')}, this code reads {MANIFEST_FORMAT}")
    return manifest


def _agree(parts: list[tuple[Path, dict]], key: str, what: str) -> Any:
    values = {json.dumps(_compared(key, m[key]), sort_keys=True): folder for folder, m in parts}
    if len(values) > 1:
        shown = "; ".join(f"{folder}: {v}" for v, folder in values.items())
        raise ConfigError(f"the folders disagree on the {what}: {shown}")
    if key == "encoder":  # the same latents; keep a decoder if any folder names one
        return next((m[key] for _, m in parts if (m[key] or {}).get("decoder")), parts[0][1][key] if parts else None)
    return parts[0][1][key] if parts else None


def _compared(key: str, value: Any) -> Any:
    # A decoder only reads latents: folders that differ by it alone hold the same latents.
    return without_decoder(value) if key == "encoder" and isinstance(value, dict) else value


def mix_manifests(out: str | Path, folders: list[str | Path]) -> Path:
    out = Path(out).expanduser()
    if (out / "job.json").is_file():
        raise ConfigError(f"{out} is a job's folder; write the mixture to another (e.g. its parent)")
    parts = [(Path(f).expanduser(), _read(Path(f).expanduser())) for f in folders]
    if not parts:
        raise ConfigError("nothing to mix: name at least one folder")
    tokenizer = _agree(parts, "tokenizer", "tokenizer")
    visual = [(f, m) for f, m in parts if m["latent_dim"] is not None]
    encoder = _agree(visual, "encoder", "encoder")
    latent_dim = _agree(visual, "latent_dim", "latent width")
    tokens_per_frame = _agree(visual, "tokens_per_frame", "tokens per frame")
    dual = [(f, m["understanding"]) for f, m in parts if m.get("understanding")]
    understanding = None
    if dual:
        agreed = {key: _agree([(f, u) for f, u in dual], key, f"understanding {what}")
                  for key, what in (("encoder", "encoder"), ("latent_dim", "latent width"),
                                    ("tokens_per_frame", "tokens per frame"))}
        pooled = [ChannelStats.from_json(u["normalization"]) for _, u in dual if u["normalization"] is not None]
        total = pooled[0] if pooled else None
        for part in pooled[1:]:
            total = total.merge(part)
        understanding = {**agreed, "normalization": None if total is None else total.to_json()}
    sources: dict[str, list[str]] = {}
    source_info: dict[str, Any] = {}
    stats: ChannelStats | None = None
    for folder, manifest in parts:
        for name, shards in manifest["sources"].items():
            if name in sources:
                raise ConfigError(f"source {name!r} appears twice (again in {folder}); rename one with --source")
            sources[name] = [os.path.relpath(folder / s, out) for s in shards]
            source_info[name] = manifest["source_info"][name]
        if manifest["normalization"] is not None:
            part = ChannelStats.from_json(manifest["normalization"])
            stats = part if stats is None else stats.merge(part)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "latent_dim": latent_dim,
            "tokens_per_frame": tokens_per_frame,
            "latent_dtype": LATENT_DTYPE,
            "encoder": encoder,
            "tokenizer": tokenizer,
            "normalization": None if stats is None else stats.to_json(),
            "sources": sources,
            "source_info": source_info,
            **({"understanding": understanding} if understanding else {}),
        },
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(f"wrote {mix_manifests(args.out, args.folders)}")


if __name__ == "__main__":
    main()
