"""The ``unimm`` command: one verb per job (train, params, isoflop, ...)."""

from __future__ import annotations

import argparse
import json
import sys

from unimm.errors import ConfigError

DESCRIPTION = """\
Unified multimodal pretraining on torchtitan: one decoder-only transformer trained on text
tokens (next-token prediction) and visual latents (flow matching). One verb per job; run
unimm VERB --help for its options."""

EPILOG = """\
examples:
  unimm train --recipe debug_cpu --steps 600 --out runs/demo
  unimm params --recipe modality_ffn_2b3
  unimm sample --run runs/demo --recipe debug_cpu --prompt "a red circle"
  unimm eval --run runs/demo --suite generation --suite captioning
  unimm convert to-hf --ckpt runs/demo/checkpoint/step-600 --out hf/demo
  unimm isoflop plan --help

train, params, sample and convert to-hf also take --section.key VALUE options for the
torchtitan config (e.g. --training.seq_len 1024)."""


def _train(args: argparse.Namespace) -> int:
    from unimm.titan.launch import Interrupted, train

    try:
        return train(
            args.recipe, args.out, args.steps, args.nproc, args.config_overrides,
            lr=args.lr, allow_config_change=args.allow_config_change,
        )
    except Interrupted as stop:
        print(f"unimm: {stop} received: torchrun and its workers were stopped", file=sys.stderr)
        return 128 + stop.signum


def _list_recipes_in_help(parser: argparse.ArgumentParser) -> None:
    """Append the recipes to ``parser``'s help, computed only when help is printed (listing
    them imports torchtitan, which every other use of the parser can do without)."""
    plain_help = parser.format_help

    def format_help() -> str:
        from unimm.titan.launch import recipe_summaries

        summaries = recipe_summaries()
        width = max(map(len, summaries))
        lines = [f"  {name:<{width}}  {summary}" for name, summary in summaries.items()]
        return plain_help() + "\nrecipes (--recipe NAME, recipes/config_registry.py):\n" + "\n".join(lines) + "\n"

    parser.format_help = format_help


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
    parser = argparse.ArgumentParser(
        prog="unimm", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser(
        "train",
        help="train a recipe through torchrun (resumes from DIR/checkpoint if present)",
        description="Further --section.key VALUE options are passed to the torchtitan config.",
    )
    train.add_argument("--recipe", required=True, help="a recipe name (listed below)")
    train.add_argument(
        "--out", required=True,
        help="run folder: metrics.jsonl, loss.png, checkpoint/, run.json; one run at a time (.unimm.lock)",
    )
    train.add_argument(
        "--steps", type=int, default=None,
        help="total training steps; a run folder already trained that far is reported finished",
    )
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    train.add_argument(
        "--lr", type=float, default=None, metavar="LR",
        help="peak learning rate (e.g. 3e-4); torchtitan spells it --optimizer.param-groups.0.optimizer-kwargs.lr",
    )
    train.add_argument(
        "--allow-config-change", action="store_true",
        help="resume although the global batch size, seq_len, shards or tokenizer differ from DIR/run.json",
    )
    train.set_defaults(func=_train, takes_overrides=True)
    _list_recipes_in_help(train)

    params = verbs.add_parser("params", help="total and active parameters of a recipe (no weights allocated)")
    params.add_argument("--recipe", required=True, metavar="NAME", help="a recipe of recipes/config_registry.py")
    params.add_argument("--json", action="store_true", help="print one JSON object (counts and FLOPs per token)")
    params.set_defaults(func=_params, takes_overrides=True)

    from unimm.convert.cli import register as register_convert
    from unimm.evaluation.cli import register as register_eval
    from unimm.plan_memory import register as register_plan_memory
    from unimm.sampling_cli import register as register_sample
    from unimm.scaling.cli import register as register_isoflop

    for register in (register_isoflop, register_convert, register_sample, register_plan_memory, register_eval):
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
