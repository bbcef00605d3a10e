"""Recipes for tools/gpu_check.py: every recipe of ``unimm.recipes`` plus resizable
(``--model_size.*``) variants of the ones the check shortens.

torchtitan selects a recipe by ``--module gpu_check_recipes --config NAME`` (with tools/ on
PYTHONPATH); the run goes through unimm's own worker entry point (``python -m unimm.titan.train``),
the same trainer ``unimm train`` starts under torchrun. The project's recipes are left unchanged.
"""

from __future__ import annotations

from unimm.recipes.config_registry import *  # noqa: F401,F403  (every project recipe stays selectable)
from unimm.recipes.config_registry import _debug, _paper
from unimm.titan.model_size import SizedTrainer, sized


def moe_e256_sized() -> SizedTrainer.Config:
    """moe_e256 (G = 16, E = 256, top-16, d_expert 512) resizable: gpu_check shortens its depth."""
    return sized(_paper("moe_e256"))


def modality_ffn_2b3_sized() -> SizedTrainer.Config:
    """modality_ffn_2b3 resizable (used only if the full model does not fit)."""
    return sized(_paper("modality_ffn_2b3"))


def debug_cpu_moe_sized() -> SizedTrainer.Config:
    """debug_cpu_moe resizable: the dry run's stand-in for moe_e256_sized."""
    return sized(_debug("debug_moe"))
