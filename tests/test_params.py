"""Parameter counts of the paper's configurations, against Table 5 and §2.2 (to 0.01B)."""

import pytest

from unimm.model.params import count_params, meta_model
from unimm.titan.launch import load_recipe

# recipe: (total, active) in billions, paper Table 5 and §2.2
PAPER = {
    "dense_1b5": (1.50, 1.50),
    "modality_ffn_2b3": (2.30, 1.50),
    "moe_e32": (2.30, 1.50),
    "moe_e64": (3.92, 1.50),
    "moe_e128": (7.14, 1.50),
    "moe_e256": (13.59, 1.51),
    "moe_e512": (26.48, 1.52),
    "moe_e1008": (51.46, 1.53),
}


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_counts_match_the_paper(recipe):
    counts = count_params(meta_model(load_recipe(recipe).model_spec.model))
    assert (round(counts.total / 1e9, 2), round(counts.active / 1e9, 2)) == PAPER[recipe]


@pytest.mark.parametrize("granularity", [1, 4, 16, 32, 64])
def test_granularity_sweep_keeps_active_compute(granularity):
    # §6.1: all granularities have ~13.5B total and 1.5B active parameters (1008 experts at G=64)
    counts = count_params(meta_model(load_recipe(f"moe_g{granularity}").model_spec.model))
    assert counts.total / 1e9 == pytest.approx(13.5, abs=0.35)
    assert counts.active / 1e9 == pytest.approx(1.5, abs=0.04)


def test_shared_expert_variants_keep_the_expert_budget():
    base = count_params(meta_model(load_recipe("moe_e256").model_spec.model))
    for recipe, n_shared in (("moe_e256_shared_global", 1), ("moe_e256_shared_per_modality", 2)):
        counts = count_params(meta_model(load_recipe(recipe).model_spec.model))
        # the same 256 experts and 16 active per token; only the router (d_model 2048, 16
        # layers) scores n_shared fewer experts
        assert base.total - counts.total == base.active - counts.active == n_shared * 16 * 2048
