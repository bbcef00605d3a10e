"""Mixture of experts: routing, shared experts, balance loss, bias updates, the modality path."""

import pytest
import torch
import torch.nn.functional as F

from unimm.data.batch import TEXT, VISION
from unimm.model.ffn import FFNConfig, ModalityFFN
from unimm.model.moe import MoE, MoEConfig, Router, update_expert_biases


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
