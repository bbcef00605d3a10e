"""``unimm train``: check the recipe and its data in this process, then run torchrun.

Checks that need no model weights run here first so that a wrong recipe name, a sequence
the model cannot hold, or shards of the wrong latent width fail with one clear line, not a
stack trace from every rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from unimm.errors import ConfigError

RECIPE_MODULE = "unimm.recipes"


def recipe_names() -> list[str]:
    from unimm.recipes import config_registry

    return sorted(
        name
        for name, fn in vars(config_registry).items()
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == config_registry.__name__
    )


def load_recipe(name: str, overrides: list[str] | None = None):
    """The recipe's Trainer.Config with command-line overrides applied (torchtitan syntax)."""
    from torchtitan.config import ConfigManager

    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    return ConfigManager().parse_args(["--module", RECIPE_MODULE, "--config", name, *(overrides or [])])


def preflight(config):
    """Check the recipe against its data without building the model; returns the manifest."""
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    config.dataloader.bind_model(model_config)
    return config.dataloader.prepare(config.training.seq_len, config.tokenizer.build())


def torchrun_command(recipe: str, overrides: list[str], nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "unimm.titan.train", "--module", RECIPE_MODULE, "--config", recipe, *overrides,
    ]


def train(recipe: str, out: str, steps: int | None, nproc: int, extra: list[str]) -> int:
    overrides = list(extra) + ["--dump_folder", str(out)]
    if steps is not None:
        overrides += ["--training.steps", str(steps)]
    preflight(load_recipe(recipe, overrides))

    env = dict(os.environ)
    # torchrun defaults every rank to 1 thread; on a CPU box share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    rc = subprocess.call(torchrun_command(recipe, overrides, nproc), env=env)
    if rc == 0:
        from unimm.plots import plot_losses

        png = plot_losses(Path(out) / "metrics.jsonl", Path(out) / "loss.png")
        if png:
            print(f"unimm: metrics in {Path(out) / 'metrics.jsonl'}, loss curves in {png}")
    return rc
