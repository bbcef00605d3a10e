"""The §6.3 stack recipes: each step changes one design choice, at paper size and on CPU alike."""

import pytest

from conftest import small_run_options
from unimm.model.params import count_params, meta_model
from unimm.titan.launch import load_recipe, preflight

CHAIN = ("transfusion", "modality_ffn", "siglip2", "moe", "x_pred")  # Figure 21, top to bottom
# each branch: the chain step it is the alternative to, and the choices it makes differently
BRANCHES = {"dual_encoder": ("siglip2", {"encoder"}), "mot": ("moe", {"ffn", "shared_experts"})}


def _design(name: str) -> dict:
    """The design choices a recipe makes, in terms that mean the same at both sizes."""
    config = load_recipe(name)
    model = config.model_spec.model
    width = {model.latent_dim, model.understanding_dim} - {0}
    return {
        "ffn": model.ffn.kind,
        "shared_experts": model.ffn.moe.shared if model.ffn.kind == "moe" else None,
        # the representation: low-width (VAE-like), high-width (semantic), or both (dual)
        "encoder": "dual" if model.understanding_dim else ("vae" if max(width) < 100 else "semantic"),
        "prediction": config.loss.flow.prediction,
    }


def _changes(a: dict, b: dict) -> set[str]:
    return {key for key in a if a[key] != b[key]}


@pytest.mark.parametrize("size", ["stack_", "stack_cpu_"])
def test_each_step_of_the_chain_changes_one_choice(size):
    designs = [_design(size + step) for step in CHAIN]
    assert designs[0] == {"ffn": "shared", "shared_experts": None, "encoder": "vae", "prediction": "v"}
    expected = [{"ffn"}, {"encoder"}, {"ffn", "shared_experts"}, {"prediction"}]
    assert [_changes(a, b) for a, b in zip(designs, designs[1:])] == expected
    assert designs[-1] == {"ffn": "moe", "shared_experts": "per_modality", "encoder": "semantic", "prediction": "x"}
    for branch, (beside, differs) in BRANCHES.items():
        assert _changes(_design(size + beside), _design(size + branch)) == differs, branch


def test_cpu_stack_has_the_paper_stack_shape():
    for step in (*CHAIN, *BRANCHES):
        assert _design(f"stack_cpu_{step}") == _design(f"stack_{step}"), step


@pytest.mark.parametrize(
    ("step", "total", "active"),
    [("transfusion", 1.50, 1.50), ("modality_ffn", 2.30, 1.50), ("moe", 13.59, 1.51), ("mot", 2.47, 1.50)],
)
def test_paper_size_steps_match_the_papers_counts(step, total, active):
    # §6.1: the MoE models have 13.5B total parameters, 1.5B active; §6.3 compares at equal FLOPs
    counts = count_params(meta_model(load_recipe(f"stack_{step}").model_spec.model))
    assert (round(counts.total / 1e9, 2), round(counts.active / 1e9, 2)) == (total, active)


@pytest.mark.parametrize("step", [*CHAIN, *BRANCHES])
def test_cpu_steps_bind_to_their_procedural_data(step, data_cache):
    # the model's latent widths and the procedural images' patching agree (preflight refuses otherwise)
    config = load_recipe(f"stack_cpu_{step}", small_run_options(data_cache))
    manifest = preflight(config)
    assert manifest.latent_dim == config.model_spec.model.latent_dim
