"""Mixture of experts: routing, shared experts, balance loss, bias updates, the modality path."""

import pytest
import torch
import torch.nn.functional as F

from unimm.data.batch import TEXT, VISION
from unimm.model.ffn import FFNConfig, ModalityFFN
from unimm.model.moe import MoE, MoEConfig, Router, combine_pairs, run_experts, update_expert_biases
from conftest import needs_expert_parallel_torch


def make_moe(**overrides) -> MoE:
    torch.manual_seed(0)
    config = MoEConfig(**{"num_experts": 6, "top_k": 3, "expert_hidden_dim": 8, "backend": "loop", **overrides})
    moe = MoE(16, config, out_std=0.02)
    moe.init_states()
    return moe


def naive_moe(moe: MoE, x_TD, modality_T):
    """Token by token: sum over its experts of weight * SwiGLU_e(x)."""
    experts, weights, _ = moe.route(x_TD, modality_T)
    w1, w3, w2 = moe.experts.w1, moe.experts.w3, moe.experts.w2
    out = torch.zeros_like(x_TD)
    for t in range(len(x_TD)):
        for e, w in zip(experts[t].tolist(), weights[t]):
            out[t] += w * ((F.silu(x_TD[t] @ w1[e]) * (x_TD[t] @ w3[e])) @ w2[e])
    return out


@pytest.mark.parametrize("shared", ["none", "global", "per_modality"])
@pytest.mark.parametrize("backend", ["loop", "torch_grouped_mm"])
def test_moe_equals_token_by_token_reference(shared, backend):
    moe = make_moe(shared=shared, backend=backend)
    x = torch.randn(2, 5, 16, requires_grad=True)
    modality = torch.tensor([[TEXT, VISION, TEXT, VISION, VISION], [TEXT] * 5])
    out, balance = moe(x, modality)
    expected = naive_moe(moe, x.reshape(10, 16), modality.reshape(-1))
    torch.testing.assert_close(out.reshape(10, 16), expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and moe.experts.w1.grad is not None and moe.router.gate.weight.grad is not None


def test_topk_selection_and_weights():
    moe = make_moe()
    x = torch.randn(7, 16)
    experts, weights, _ = moe.route(x, torch.zeros(7, dtype=torch.long))
    probs = (x @ moe.router.gate.weight.T).softmax(-1)
    top = probs.topk(3, dim=-1)
    assert torch.equal(experts, top.indices)
    torch.testing.assert_close(weights, top.values)


def test_shared_experts():
    modality = torch.tensor([TEXT, VISION, VISION, TEXT])
    x = torch.randn(4, 16)
    experts, weights, _ = make_moe(shared="global").route(x, modality)
    assert (experts[:, 0] == 0).all() and (weights[:, 0] == 1).all()
    assert (experts[:, 1:] >= 1).all(), "routed experts never include the shared one"
    experts, weights, _ = make_moe(shared="per_modality").route(x, modality)
    assert experts[:, 0].tolist() == [0, 1, 1, 0], "each token gets only its modality's shared expert"
    assert (experts[:, 1:] >= 2).all(), "neither shared expert is routed to"
    assert experts.shape == (4, 3), "top_k counts the shared expert"


def test_balance_loss_hand_computed():
    router = Router(2, MoEConfig(num_experts=2, top_k=1, expert_hidden_dim=4))
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.9, 0.1]])
    picks = torch.tensor([[0], [0], [1], [0]])
    # f = [3/4, 1/4], P = [0.6, 0.4] -> 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert router.balance_loss(scores, picks).item() == pytest.approx(1.1)
    uniform = torch.full((4, 2), 0.5)
    assert router.balance_loss(uniform, torch.tensor([[0], [1], [0], [1]])).item() == pytest.approx(1.0)


def test_bias_update_moves_selection_toward_idle_experts():
    moe = make_moe(load_balance="bias", bias_update_rate=0.1, shared="global")
    loads = torch.tensor([[9.0, 5.0, 1.0, 1.0, 1.0, 1.0]])  # expert 0 is shared: not biased
    update_expert_biases([moe], loads)
    # routed loads [5, 1, 1, 1, 1]: mean 1.8 -> signs [-1, +1, +1, +1, +1], minus their mean 0.6
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.16, 0.04, 0.04, 0.04, 0.04]))


def test_tokens_per_expert_counts_every_assignment():
    moe = make_moe(shared="per_modality")
    modality = torch.tensor([[TEXT, VISION, VISION]])
    moe(torch.randn(1, 3, 16), modality)
    counts = moe.tokens_per_expert
    assert counts[0] == 1 and counts[1] == 2 and counts.sum() == 3 * 3


def test_modality_ffn_sends_every_token_through_exactly_its_own_expert():
    torch.manual_seed(0)
    ffn = ModalityFFN(16, FFNConfig(kind="modality", hidden_dim=8, backend="torch_grouped_mm"), 0.02)
    ffn.init_states()
    x = torch.randn(3, 4, 16)
    modality = torch.tensor([[TEXT, VISION, VISION, TEXT], [VISION] * 4, [TEXT] * 4])
    out, _ = ffn(x, modality)
    e = ffn.experts
    for m in (TEXT, VISION):
        rows = x[modality == m]
        expected = (F.silu(rows @ e.w1[m]) * (rows @ e.w3[m])) @ e.w2[m]
        torch.testing.assert_close(out[modality == m], expected, rtol=1e-5, atol=1e-6)


def index_add_combine(y_AD, order, weights_Tk):
    """The combine unimm used before: weight each pair, atomically add it into its token."""
    T, k = weights_Tk.shape
    out = torch.zeros(T, y_AD.shape[1], dtype=y_AD.dtype)
    return out.index_add_(0, order // k, y_AD * weights_Tk.flatten()[order, None].to(y_AD.dtype))


def test_combine_sums_each_tokens_pairs_in_fp32_in_slot_order():
    torch.manual_seed(0)
    T, k, D = 11, 3, 8
    experts_Tk = torch.randint(0, 5, (T, k))
    order = torch.argsort(experts_Tk.flatten(), stable=True)
    weights_Tk = torch.rand(T, k)
    y_AD = torch.randn(T * k, D)
    out = combine_pairs(y_AD, order, weights_Tk)
    # fp32: the old atomic combine to rounding
    torch.testing.assert_close(out, index_add_combine(y_AD, order, weights_Tk), rtol=1e-6, atol=1e-6)
    # the defined order, bit for bit: slot 0 + slot 1 + slot 2 of each token, in fp32
    y_TkD = torch.empty(T * k, D)
    y_TkD[order] = y_AD
    y_TkD = y_TkD.reshape(T, k, D) * weights_Tk[:, :, None]
    assert torch.equal(out, y_TkD[:, 0] + y_TkD[:, 1] + y_TkD[:, 2])
    # bf16 outputs: summed in fp32, rounded once
    y_bf16 = y_AD.bfloat16()
    slots = y_bf16.float()[torch.argsort(order)].reshape(T, k, D) * weights_Tk[:, :, None]
    assert torch.equal(combine_pairs(y_bf16, order, weights_Tk), (slots[:, 0] + slots[:, 1] + slots[:, 2]).bfloat16())
    assert torch.equal(combine_pairs(y_bf16, order, weights_Tk), combine_pairs(y_bf16, order, weights_Tk))


def test_combine_gradients_match_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    T, k, D = 7, 4, 5
    order = torch.argsort(torch.randint(0, 3, (T * k,)), stable=True)
    y = torch.randn(T * k, D, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    y_ref, w_ref = y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dy = torch.randn(T, D)
    (combine_pairs(y, order, w) * dy).sum().backward()
    (index_add_combine(y_ref, order, w_ref) * dy).sum().backward()
    torch.testing.assert_close(y.grad, y_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_combine_runs_no_accumulating_op():
    """index_add_ / scatter_add / index_put_(accumulate=True) are the atomic (order-dependent
    on CUDA) ops; the combine's forward uses none of them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            accumulate = func.__name__.startswith("index_put") and (kwargs.get("accumulate") or (len(args) > 3 and args[3]))
            self.seen.append("index_put(accumulate)" if accumulate else func.__name__)
            return func(*args, **kwargs)

    T, k = 6, 2
    order = torch.argsort(torch.randint(0, 3, (T * k,)), stable=True)
    with Ops() as ops:
        combine_pairs(torch.randn(T * k, 4), order, torch.rand(T, k))
    atomic = [op for op in ops.seen if op.startswith(("index_add", "scatter_add", "index_put(accumulate)"))]
    assert ops.seen and not atomic, ops.seen
    with Ops() as ops:
        index_add_combine(torch.randn(T * k, 4), order, torch.rand(T, k))
    assert any(op.startswith("index_add") for op in ops.seen), "the check sees the old combine's atomic op"


def test_moe_output_unchanged_by_the_deterministic_combine():
    moe = make_moe(shared="global", backend="torch_grouped_mm")
    x_TD = torch.randn(9, 16)
    experts, weights, _ = moe.route(x_TD, torch.zeros(9, dtype=torch.long))
    order = torch.argsort(experts.flatten(), stable=True)
    offsets = torch.cumsum(torch.bincount(experts.flatten(), minlength=6), 0).to(torch.int32)
    from unimm.kernels import swiglu_experts

    y_AD = swiglu_experts(x_TD, *moe.experts.local(), offsets, backend="torch_grouped_mm", gather_idx=order // 3)
    torch.testing.assert_close(
        run_experts(moe.experts, x_TD, experts, weights, "torch_grouped_mm"),
        index_add_combine(y_AD, order, weights), rtol=1e-6, atol=1e-6,
    )


def _expert_parallel_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")  # as unimm's recipes run torchtitan
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    for shared in ("global", "per_modality"):
        # 8 experts, top-3 of which the token's shared one: 2 routed slots per token
        full = make_moe(shared=shared, num_experts=8, top_k=3, backend="torch_grouped_mm")
        ep = make_moe(shared=shared, num_experts=8, top_k=3, backend="torch_grouped_mm")
        ep.enable_expert_parallel(mesh)
        received = []
        dispatch = ep.dispatcher.dispatch

        def spy(*args):
            result = dispatch(*args)
            received.append(int(result[1].sum()))
            return result

        ep.dispatcher.dispatch = spy
        torch.manual_seed(1)
        x = torch.randn(2, 16, 16)
        modality = torch.randint(0, 2, (2, 16))
        # 1 process: both rows; EP: row `rank` on each rank, same weights
        x_full = x.clone().requires_grad_()
        out_full, _ = full(x_full, modality)
        out_full.sum().backward()
        x_mine = x[rank : rank + 1].clone().requires_grad_()
        out_mine, _ = ep(x_mine, modality[rank : rank + 1])
        out_mine.sum().backward()
        torch.testing.assert_close(out_mine, out_full[rank : rank + 1].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_mine.grad, x_full.grad[rank : rank + 1], rtol=1e-5, atol=1e-6)
        for name in ("w1", "w3", "w2"):  # this rank's 4 experts, shared rows included
            grad = getattr(ep.experts, name).grad.to_local()
            torch.testing.assert_close(grad, getattr(full.experts, name).grad[4 * rank : 4 * rank + 4], rtol=1e-4, atol=1e-6)
        # tokens each rank received: the routed pairs of its experts only (no shared expert
        # goes through the dispatcher), from both ranks' 16 tokens
        experts, _, _ = full.route(x.reshape(32, 16), modality.reshape(32))
        routed_E = torch.bincount(experts[:, 1:].flatten(), minlength=8)
        assert received == [int(routed_E[4 * rank : 4 * rank + 4].sum())], (shared, received)
        n_shared = 1 if shared == "global" else 2
        assert routed_E.sum() == 32 * 2 and routed_E[:n_shared].sum() == 0, "shared experts are never dispatched"
        # balanced-ish: through the dispatcher, the rank holding expert 0 would also get all 32 tokens
        assert received[0] <= 0.75 * 64, received
    dist.destroy_process_group()


@pytest.mark.slow
@needs_expert_parallel_torch
def test_expert_parallel_runs_shared_experts_densely_and_matches_one_process(tmp_path):
    """EP=2 over gloo: outputs and gradients equal 1 process, and each rank receives only
    the routed pairs of its own experts (not every token for the shared expert)."""
    import torch.multiprocessing as mp

    # spawn, not fork: a fork after torch has used its OpenMP pool can hang in the child
    mp.spawn(_expert_parallel_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)
