"""Per-block torch.compile(fullgraph=True) (what torchtitan applies) of every FFN kind, and the
selective activation checkpointing policy that saves the grouped GEMMs.

The expert engine's GEMMs are torch.library custom ops (``unimm::grouped_mm`` and its two
gradients): compile traces them by their shapes alone, and SAC sees each as one op it can save.
Tiny dims, CPU, ``aot_eager`` (the AOT autograd graphs, without Inductor's codegen).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import losses, train_recipe
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.moe import MoEConfig
from unimm.model.transformer import UnimmModel
from unimm.titan.parallelize import build_activation_checkpointing

MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
POSITIONS = list(range(11)) + list(range(5))
B, L, DIM = 2, len(MODALITY), 32

KINDS = ["shared", "modality", "moe", "mot"]
# Grouped GEMMs per block forward: SwiGLU experts (3), and for MoT the 4 attention projections.
GEMMS_PER_BLOCK = {"shared": 0, "modality": 3, "moe": 3, "mot": 7}


def tiny_model(kind: str, backend: str = "auto") -> UnimmModel:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16, shared="global", backend=backend)
    config = UnimmModel.Config(
        vocab_size=50, dim=DIM, n_layers=1, n_heads=4, n_kv_heads=2,
        ffn=FFNConfig(kind=kind, hidden_dim=48, moe=moe, backend=backend),
        max_seq_len=64, latent_dim=6, rope_theta=10_000.0,
    )
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    return model


def rows(values: list[int]) -> torch.Tensor:
    return torch.tensor([values] * B)


def run_block(block, model: UnimmModel, seed: int = 1):
    """One block's forward and backward: (output, balance loss, input grad, param grads)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, DIM, generator=g).requires_grad_()
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, -3:] = False
    mask = build_attention_mask(rows(DOCS), rows(FRAMES), "sdpa")
    out, balance = block(x, rows(MODALITY), model.rope, rows(POSITIONS), mask, None, valid)
    dy = torch.randn(out.shape, generator=g)
    ((out * dy).sum() + balance).backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in block.named_parameters()
             if p.grad is not None}
    block.zero_grad(set_to_none=True)
    return out.detach(), balance.detach(), x.grad, grads


def assert_same(eager, compiled):
    for a, b in zip(eager[:3], compiled[:3]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert eager[3].keys() == compiled[3].keys()
    for name in eager[3]:
        torch.testing.assert_close(compiled[3][name], eager[3][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_block_compiles_fullgraph(kind):
    torch._dynamo.reset()
    model = tiny_model(kind)
    block = model.layers["0"]
    eager = run_block(block, model)
    compiled = run_block(torch.compile(block, fullgraph=True, backend="aot_eager"), model)
    assert_same(eager, compiled)


@pytest.mark.parametrize("kind", ["moe", "modality"])
def test_block_compiles_fullgraph_with_host_reading_backend(kind):
    """The loop backend reads offsets on the host: inside its custom op, compile never sees it."""
    torch._dynamo.reset()
    model = tiny_model(kind, backend="loop")
    block = model.layers["0"]
    eager = run_block(block, model)
    compiled = run_block(torch.compile(block, fullgraph=True, backend="aot_eager"), model)
    assert_same(eager, compiled)


def test_moe_counts_are_static_shape():
    """The MoE's expert counts: bincount's values, in a fixed-size tensor, padding left out."""
    from unimm.model.moe import count_per_expert

    experts = torch.tensor([[0, 3], [3, 1], [0, 3]])
    valid = torch.tensor([True, False, True])
    assert count_per_expert(experts, 5).tolist() == [2, 1, 0, 3, 0]
    assert count_per_expert(experts, 5, valid).tolist() == [2, 0, 0, 2, 0]


class CountOps(TorchDispatchMode):
    """Counts the grouped-GEMM forward op as it reaches the kernels (a SAC cache hit never does)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.unimm.grouped_mm.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def gemm_calls(kind: str, ac_config) -> tuple[int, int, dict]:
    """Forward-op runs in the forward and in the backward of one block, and the grads."""
    model = tiny_model(kind)
    if ac_config is not None:
        build_activation_checkpointing(ac_config).apply(model)
    block = model.layers["0"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, DIM, generator=g).requires_grad_()
    mask = build_attention_mask(rows(DOCS), rows(FRAMES), "sdpa")
    with CountOps() as counter:
        out, balance = block(x, rows(MODALITY), model.rope, rows(POSITIONS), mask)
        forward = counter.calls
        (out.square().sum() + balance).backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in block.named_parameters()}
    return forward, counter.calls - forward, {"x": x.grad, **grads}


@pytest.mark.parametrize("kind", ["moe", "mot"])
def test_selective_ac_saves_grouped_gemms(kind):
    n = GEMMS_PER_BLOCK[kind]
    fwd, bwd, grads = gemm_calls(kind, None)
    assert (fwd, bwd) == (n, 0)
    fwd, bwd, sac_grads = gemm_calls(kind, SelectiveAC.Config())
    assert (fwd, bwd) == (n, 0), "selective AC re-ran a grouped GEMM in backward"
    fwd, bwd, full_grads = gemm_calls(kind, FullAC.Config())
    assert (fwd, bwd) == (n, n), "full AC recomputes the whole block"
    for name, grad in grads.items():
        torch.testing.assert_close(sac_grads[name], grad, msg=name)
        torch.testing.assert_close(full_grads[name], grad, msg=name)


AC_CONFIGS = {"selective": SelectiveAC.Config, "full": FullAC.Config}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("kind", ["moe", "mot"])
def test_checkpointed_block(kind, mode, compiled):
    """torchtitan's order (AC, then per-block fullgraph compile): the no-AC eager gradients, and
    the MoE's load counters count each routing slot once (eager AC re-runs the forward)."""
    torch._dynamo.reset()
    plain = tiny_model(kind)
    reference = run_block(plain.layers["0"], plain)
    model = tiny_model(kind)
    build_activation_checkpointing(AC_CONFIGS[mode]()).apply(model)
    block = model.layers["0"]
    if compiled:
        block = torch.compile(block, fullgraph=True, backend="aot_eager")
    result = run_block(block, model)
    strip = "_checkpoint_wrapped_module."
    assert_same(reference, (*result[:3], {n.replace(strip, ""): g for n, g in result[3].items()}))
    if kind == "moe":
        valid_slots = (B * L - 3) * 2  # run_block pads 3 positions; top_k = 2
        assert model.layers["0"].feed_forward.tokens_per_expert.sum().item() == valid_slots


def test_a_top_level_kernels_import_leaves_the_ops_alone():
    # From the repository root this folder is also a top-level `kernels`, the name of Hugging
    # Face's hub-kernels package, which transformers imports when it finds one; registering the
    # custom ops a second time would hide them from the checkpointing policy's save list.
    root = Path(__file__).resolve().parents[1]
    code = (
        "import torch, unimm.kernels as k, kernels; from transformers import LlamaForCausalLM; "
        "assert torch.ops.unimm.grouped_mm.default in k.GROUPED_GEMM_OPS"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)


@pytest.mark.slow
def test_compiled_training_follows_the_eager_curve(tmp_path, data_cache):
    """`--compile.enable` (torchtitan's per-block compile, with fullgraph) on the MoE debug
    recipe trains the same run as eager: same data, same init, losses within float tolerance
    (aot_eager runs the same kernels, so they agree to the bit here)."""
    train_recipe("debug_cpu_moe", tmp_path / "eager", data_cache, steps=4)
    run = train_recipe("debug_cpu_moe", tmp_path / "compiled", data_cache, "--compile.enable",
                       "--compile.backend", "aot_eager", steps=4)
    assert "Compiling each TransformerBlock" in run.stdout + run.stderr
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), (step, eager, compiled)
    assert eager[4] != eager[1]  # the weights moved: a later step is not the first one again
