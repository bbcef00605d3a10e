"""`unimm convert to-hf | from-hf`: checkpoints to and from Hugging Face format."""

from __future__ import annotations

import argparse
from pathlib import Path


def _to_hf(args: argparse.Namespace) -> int:
    from unimm.convert.to_hf import ExportRequest, export_to_hf

    arch = export_to_hf(
        ExportRequest(
            checkpoint=args.ckpt,
            out=args.out,
            fmt=args.format,
            dtype=args.dtype,
            recipe=args.recipe,
            overrides=tuple(args.config_overrides),
            max_shard_bytes=int(args.max_shard_gb * 10**9),
            overwrite=args.overwrite,
        )
    )
    print(f"unimm: wrote {args.out} (--format {args.format}, {args.dtype}) from {args.ckpt}; architecture: {arch.source}")
    return 0


def _from_hf(args: argparse.Namespace) -> int:
    from unimm.convert.from_hf import import_from_hf

    flavors = import_from_hf(args.hf, args.out, args.overwrite)
    fits = f"model flavor {', '.join(flavors)}" if flavors else "no registered model flavor"
    print(
        f"unimm: wrote {args.out / 'checkpoint' / 'step-0'} ({fits}); "
        f"`unimm train --recipe NAME --out {args.out}` continues from it"
    )
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    convert = verbs.add_parser("convert", help="checkpoints to and from Hugging Face format", description=__doc__)
    directions = convert.add_subparsers(dest="direction", required=True)

    to_hf = directions.add_parser(
        "to-hf",
        help="a DCP checkpoint (DIR/checkpoint/step-N) to a Hugging Face model folder",
        description=(
            "The architecture is the registered model flavor whose tensors match the checkpoint and "
            "the tokenizer the byte one; or pass the run's --recipe NAME and the same --section.key "
            "VALUE options given to unimm train (e.g. --model_size.*, --tokenizer.path)."
        ),
    )
    to_hf.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder, e.g. runs/demo/checkpoint/step-300")
    to_hf.add_argument("--out", required=True, type=Path, help="Hugging Face folder to write")
    to_hf.add_argument("--format", choices=["unimm", "llama"], default="unimm",
                       help="unimm: whole model, trust_remote_code; llama: text backbone as stock LlamaForCausalLM")
    to_hf.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights as stored (fp32: lossless)")
    to_hf.add_argument("--recipe", default=None, help="the recipe the checkpoint was trained with")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    to_hf.set_defaults(func=_to_hf, takes_overrides=True)

    from_hf = directions.add_parser(
        "from-hf",
        help="a folder `to-hf --format unimm` wrote, back to DIR/checkpoint/step-0",
    )
    from_hf.add_argument("--hf", required=True, type=Path, help="Hugging Face folder")
    from_hf.add_argument("--out", required=True, type=Path, help="run folder; gets checkpoint/step-0")
    from_hf.add_argument("--overwrite", action="store_true", help="replace an existing DIR/checkpoint folder")
    from_hf.set_defaults(func=_from_hf)
