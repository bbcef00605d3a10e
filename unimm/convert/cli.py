"""`unimm convert to-hf | from-hf | dense-to-mot`: checkpoints to and from Hugging Face format,
and a dense checkpoint to a Mixture-of-Transformers start."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Checkpoints to and from Hugging Face format.

  to-hf    a DCP checkpoint (RUN/checkpoint/step-N) to a Hugging Face folder: the whole
           model with its modeling code (--format unimm, loads with trust_remote_code), or
           the text backbone as a stock LlamaForCausalLM (--format llama)
  from-hf  a folder written by to-hf --format unimm, back to RUN/checkpoint/step-0, which
           unimm train continues from
  dense-to-mot
           a dense or modality-FFN checkpoint to the Mixture of Transformers that computes
           the same (text weights copied into the vision copy), as RUN/checkpoint/step-0

Run unimm convert to-hf --help or unimm convert from-hf --help for their options."""

EPILOG = """\
examples:
  unimm convert to-hf --ckpt runs/demo/checkpoint/step-600 --out hf/demo
  unimm convert to-hf --ckpt runs/demo/checkpoint/step-600 --out hf/demo-llama --format llama
  unimm convert from-hf --hf hf/demo --out runs/from_hf
  unimm convert dense-to-mot --ckpt runs/demo/checkpoint/step-600 --out runs/mot"""


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
            allow_nonfinite=args.allow_nonfinite,
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


def _dense_to_mot(args: argparse.Namespace) -> int:
    from unimm.convert.mot import dense_to_mot

    arch, flavors = dense_to_mot(args.ckpt, args.out, args.recipe, tuple(args.config_overrides), args.overwrite)
    fits = f"model flavor {', '.join(flavors)}" if flavors else "no registered model flavor"
    print(
        f"unimm: wrote {args.out / 'checkpoint' / 'step-0'} ({fits}), the Mixture of Transformers of {args.ckpt} "
        f"({arch.source}); `unimm train --recipe NAME --out {args.out}` continues from it"
    )
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    convert = verbs.add_parser(
        "convert",
        help="checkpoints to and from Hugging Face format",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

    to_hf = directions.add_parser(
        "to-hf",
        help="a DCP checkpoint (DIR/checkpoint/step-N) to a Hugging Face model folder",
        description=(
            "The architecture is the registered model flavor whose tensors match the checkpoint and "
            "the tokenizer the byte one; or pass the run's --recipe NAME and the same --section.key "
            "VALUE options given to unimm train (e.g. --model_size.*, --tokenizer.path, "
            "--dataloader.shards: the shards' manifest.json records the tokenizer, and any other one is refused)."
        ),
    )
    to_hf.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder, e.g. runs/demo/checkpoint/step-300")
    to_hf.add_argument("--out", required=True, type=Path, help="Hugging Face folder to write")
    to_hf.add_argument("--format", choices=["unimm", "llama"], default="unimm",
                       help="unimm: whole model, trust_remote_code; llama: text backbone as stock LlamaForCausalLM")
    to_hf.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights as stored (fp32: lossless)")
    to_hf.add_argument("--recipe", default=None, help="the recipe the checkpoint was trained with")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out Hugging Face folder (never a run or checkpoint folder)")
    to_hf.add_argument("--allow-nonfinite", action="store_true",
                       help="export NaN/Inf weights (with a warning) instead of refusing the checkpoint")
    to_hf.set_defaults(func=_to_hf, takes_overrides=True)

    from_hf = directions.add_parser(
        "from-hf",
        help="a folder written by to-hf --format unimm, back to DIR/checkpoint/step-0",
        description="Reads a folder written by unimm convert to-hf --format unimm into DIR/checkpoint/step-0 "
        "(model weights only); unimm train --recipe NAME --out DIR continues from it.",
    )
    from_hf.add_argument("--hf", required=True, type=Path, help="Hugging Face folder")
    from_hf.add_argument("--out", required=True, type=Path, help="run folder; gets checkpoint/step-0")
    from_hf.add_argument("--overwrite", action="store_true",
                         help="replace a DIR/checkpoint/step-0 an earlier from-hf wrote; a folder holding a "
                         "training run's checkpoints or metrics is always refused")
    from_hf.set_defaults(func=_from_hf)

    to_mot = directions.add_parser(
        "dense-to-mot",
        help="a dense or modality-FFN checkpoint to a Mixture of Transformers start, DIR/checkpoint/step-0",
        description="Writes DIR/checkpoint/step-0 (model weights only): the Mixture of Transformers (ffn.kind mot) "
        "of the checkpoint's size whose text and vision copies both hold the checkpoint's weights (a modality "
        "FFN's two FFNs stay per modality), so it computes what the checkpoint computes; unimm train --recipe "
        "NAME --out DIR (debug_cpu_mot, mot_2b5, ...) continues from it. The source architecture is the "
        "registered flavor its tensors match, or pass its --recipe NAME and --section.key VALUE options.",
    )
    to_mot.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder, e.g. runs/demo/checkpoint/step-600")
    to_mot.add_argument("--out", required=True, type=Path, help="run folder; gets checkpoint/step-0")
    to_mot.add_argument("--recipe", default=None, help="the recipe the checkpoint was trained with")
    to_mot.add_argument("--overwrite", action="store_true",
                        help="replace a DIR/checkpoint/step-0 an earlier dense-to-mot wrote; a folder holding a "
                        "training run's checkpoints or metrics is always refused")
    to_mot.set_defaults(func=_dense_to_mot, takes_overrides=True)
