"""The ``unimm`` command: one verb per job (train, params, isoflop, ...)."""

from __future__ import annotations

import argparse
import json
import sys

from unimm.errors import ConfigError


def _train(args: argparse.Namespace) -> int:
    from unimm.titan.launch import train

    return train(args.recipe, args.out, args.steps, args.nproc, args.config_overrides)


def _params(args: argparse.Namespace) -> int:
    from unimm.flops import TYPICAL_MIX, model_flops
    from unimm.model.params import count_params, meta_model
    from unimm.titan.launch import load_recipe

    config = load_recipe(args.recipe, args.config_overrides)
    model = meta_model(config.model_spec.model)
    counts = count_params(model)
    seq_len = config.training.seq_len
    flops = model_flops(model).per_token(TYPICAL_MIX, seq_len)
    if args.json:
        print(json.dumps({
            "total_params": counts.total,
            "active_params": counts.active,
            "adapter_params": counts.adapter,
            "flops_per_token": flops.mean,
            "flops_per_text_token": flops.text,
            "flops_per_visual_token": flops.vision,
            "six_n": flops.six_n,
        }))
    else:
        print(
            f"{args.recipe}: total {counts.total / 1e9:.2f}B  active {counts.active / 1e9:.2f}B  "
            f"(+ visual adapters {counts.adapter / 1e6:.1f}M, not counted, as in the paper's Table 5)"
        )
        print(
            f"training FLOPs per token at seq_len {seq_len}, typical packed mask: {flops.mean:.3g} "
            f"(text {flops.text:.3g}, visual {flops.vision:.3g}); 6N = {flops.six_n:.3g}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimm", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser(
        "train",
        help="train a recipe through torchrun (resumes from DIR/checkpoint if present)",
        description="Further --section.key VALUE options are passed to the torchtitan config.",
    )
    train.add_argument("--recipe", required=True)
    train.add_argument("--out", required=True, help="run folder: metrics.jsonl, loss.png, checkpoint/")
    train.add_argument("--steps", type=int, default=None, help="total training steps")
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    train.set_defaults(func=_train, takes_overrides=True)

    params = verbs.add_parser("params", help="total and active parameters of a recipe (no weights allocated)")
    params.add_argument("--recipe", required=True)
    params.add_argument("--json", action="store_true")
    params.set_defaults(func=_params, takes_overrides=True)

    from unimm.convert.cli import register as register_convert
    from unimm.sampling_cli import register as register_sample
    from unimm.scaling.cli import register as register_isoflop

    for register in (register_isoflop, register_convert, register_sample):
        register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # train, params, sample, ... pass --section.key options through to the torchtitan config
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    args.config_overrides = extra
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"unimm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
