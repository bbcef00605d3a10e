"""The training step without host syncs: the loader's wire format (latent rows, index tensors of
fixed capacity), the chunked cross-entropy, the step run without any op whose output depends on
tensor data (each such op waits for the device on CUDA), and the loss path compiled as one graph
(fullgraph=True), equal to eager and to the boolean-indexed computation it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from unimm.data import wire
from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT, VISION
from unimm.flow import FlowMatchingConfig, flow_loss_sum, interpolate
from unimm.losses import TransfusionLoss, chunked_cross_entropy_sum, masked_flow_loss_sum
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.transformer import UnimmModel, rows_at

PAD = 0
V, C, B, L = 50, 6, 2, 16
# row: text(0-3) frame 0 (4-7) text(8-10) | doc 1: text(11-12) frame 1 (13-15); row 1 ends in padding
MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
POSITIONS = list(range(11)) + list(range(5))


def dense_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A dense batch as the packer lays it out: latents at framed positions, zeros elsewhere;
    row 1 has a clean frame (denoise False) and trailing padding."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.tensor([FRAMES, FRAMES[:11] + [NO_FRAME] * 5])
    modality = torch.tensor([MODALITY, MODALITY[:11] + [TEXT] * 5])
    visual = frames != NO_FRAME
    tokens = torch.where(visual, PAD, torch.randint(1, V, (B, L), generator=g))
    tokens[1, 11:] = PAD  # padding
    labels = torch.where(visual, IGNORE_INDEX, torch.randint(1, V, (B, L), generator=g))
    labels[:, 10] = labels[1, 11:] = IGNORE_INDEX  # document ends, padding
    denoise = visual.clone()
    denoise[1, 4:8] = False  # a clean conditioning frame
    fields = {
        "tokens": tokens,
        "latents": torch.randn(B, L, C, generator=g) * visual[..., None],
        "modality": modality,
        "document_ids": torch.tensor([DOCS, DOCS[:11] + [1] * 5]),
        "frame_ids": frames,
        "positions": torch.tensor([POSITIONS, POSITIONS]),
        "denoise": denoise,
    }
    return fields, labels


def tiny_model() -> UnimmModel:
    torch.manual_seed(0)
    config = UnimmModel.Config(
        vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn=FFNConfig(kind="modality", hidden_dim=48), max_seq_len=64, latent_dim=C, rope_theta=10_000.0,
    )
    model = config.build()
    model.init_weights()
    torch.nn.init.normal_(model.flow_head.weight, std=0.1)  # zero-initialised by design
    return model


# ---------------------------------------------------------------- chunked cross-entropy


def test_chunked_cross_entropy_equals_plain_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, V, bias=False)
    labels = torch.randint(0, V, (37,), generator=g)
    labels[::5] = IGNORE_INDEX
    plain = F.cross_entropy(head(h), labels, reduction="sum", ignore_index=IGNORE_INDEX)
    plain_grads = torch.autograd.grad(plain, [h, head.weight])
    chunked = chunked_cross_entropy_sum(h, head.weight, labels, chunk_rows=8)  # 5 chunks, the last of 5 rows
    chunked_grads = torch.autograd.grad(chunked, [h, head.weight])
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="lm_chunk_rows=0"):
        chunked_cross_entropy_sum(h, head.weight, labels, chunk_rows=0)


def test_chunked_cross_entropy_keeps_no_logits_for_backward():
    # What autograd saves between forward and backward: plain CE keeps [N, V] tensors (logits,
    # log-softmax); the chunked one keeps the hidden rows, the weight [V, D] and the labels.
    h = torch.randn(64, 16, requires_grad=True)
    head = torch.nn.Linear(16, V, bias=False)
    labels = torch.randint(0, V, (64,))

    def saved_shapes(loss_fn) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            loss_fn()
        return shapes

    def logits_like(shapes) -> list[tuple[int, ...]]:
        return [shape for shape in shapes if len(shape) == 2 and shape[1] == V]

    assert (64, V) in logits_like(saved_shapes(lambda: F.cross_entropy(head(h).float(), labels, reduction="sum")))
    chunked = saved_shapes(lambda: chunked_cross_entropy_sum(h, head.weight, labels, chunk_rows=16))
    assert (16, 16) in chunked and logits_like(chunked) == []


def test_masked_flow_loss_is_the_flow_loss_of_the_valid_rows():
    g = torch.Generator().manual_seed(0)
    pred, z0, eps = (torch.randn(9, C, generator=g) for _ in range(3))
    t = torch.rand(9, 1, generator=g)
    valid = torch.tensor([True, False, True, True, False, True, True, False, False])
    for prediction in ("v", "x"):
        config = FlowMatchingConfig(prediction=prediction)
        expected = flow_loss_sum(pred[valid], z0[valid], eps[valid], t[valid], config)
        torch.testing.assert_close(masked_flow_loss_sum(pred, z0, eps, t, valid, config), expected)


# ---------------------------------------------------------------- wire format


def test_capacity_is_fixed_until_a_batch_overflows_it():
    assert wire.capacity(10, 256, 0.75) == 192  # 0.75 * 256
    assert wire.capacity(192, 256, 0.75) == 192
    assert wire.capacity(193, 256, 0.75) == 256  # overflow: every position
    assert wire.capacity(0, 100, 0.3) == 64  # 30 rounded up to the multiple of 64
    assert wire.capacity(0, 40, 0.3) == 40  # never more than the positions


def test_wire_rows_reconstruct_the_dense_batch():
    fields, labels = dense_batch()
    exact = wire.encode(fields, labels, wire.WireFormat(), PAD)
    assert exact["latents"].shape == (int((fields["frame_ids"] != NO_FRAME).sum()), C)  # rows, not [B, L, C]
    on_device = wire.to_device(exact, "cpu")
    assert torch.equal(on_device["latents"], fields["latents"])  # float32: exact
    for key in ("tokens", "modality", "document_ids", "frame_ids", "positions", "denoise"):
        assert torch.equal(on_device[key], fields[key])
    half = wire.to_device(wire.encode(fields, labels, wire.WireFormat(latent_dtype="bfloat16"), PAD), "cpu")
    assert half["latents"].dtype == torch.float32
    assert torch.equal(half["latents"], fields["latents"].bfloat16().float())
    assert not torch.equal(half["latents"], fields["latents"])  # bfloat16 did round


def test_wire_carries_a_dual_encoders_understanding_rows():
    fields, labels = dense_batch()
    understanding = torch.zeros(B, L, dtype=torch.bool)
    understanding[1, 4:8] = True  # row 1's clean frame is an understanding image
    fields["understanding"] = understanding
    fields["understanding_latents"] = torch.randn(B, L, 4) * understanding[..., None]
    fields["latents"] = fields["latents"] * ~understanding[..., None]  # generation latents hold nothing there
    inputs = wire.encode(fields, labels, wire.WireFormat(), PAD)
    assert inputs["understanding_latents"].shape == (4, 4) and inputs["latents"].shape == (4 + 3, C)  # row 0 frames; row 1 has only the understanding one
    on_device = wire.to_device(inputs, "cpu")
    for key in ("latents", "understanding_latents", "understanding"):
        assert torch.equal(on_device[key], fields[key]), key


def test_wire_index_tensors_select_what_boolean_masks_select():
    fields, labels = dense_batch()
    fmt = wire.WireFormat(lm_capacity=0.5, flow_capacity=0.25)
    inputs = wire.encode(fields, labels, fmt, PAD)
    targets = labels != IGNORE_INDEX
    n_lm, n_flow = int(targets.sum()), int(fields["denoise"].sum())
    assert inputs["lm_index"].shape == inputs["lm_labels"].shape == (B * L,)  # 16 > 0.5 * 32 rounds to 32
    assert torch.equal(inputs["lm_labels"][:n_lm], labels[targets])
    assert (inputs["lm_labels"][n_lm:] == IGNORE_INDEX).all()
    assert torch.equal(rows_at(labels[..., None], inputs["lm_index"][:n_lm]).squeeze(1), labels[targets])
    assert inputs["flow_index"].shape == (B * L,) and inputs["flow_valid"].sum() == n_flow
    assert torch.equal(inputs["flow_index"][inputs["flow_valid"]], fields["denoise"].reshape(-1).nonzero().squeeze(1))
    real = 2 * L - 5
    assert inputs["counts"].tolist() == [n_lm, n_flow, real]


# ---------------------------------------------------------------- the model and the loss path


def test_index_positions_give_the_boolean_positions_outputs():
    model = tiny_model()
    fields, labels = dense_batch()
    batch = wire.to_device(wire.encode(fields, labels, wire.WireFormat(), PAD), "cpu")
    mask = build_attention_mask(batch["document_ids"], batch["frame_ids"], "sdpa")
    args = (batch["tokens"], batch["latents"], torch.full((B, L), 0.5), batch["modality"], batch["positions"], mask)
    targets = labels != IGNORE_INDEX
    logits, flow, _ = model(*args, targets, fields["denoise"])
    logits_i, flow_i, _ = model(*args, batch["lm_index"], batch["flow_index"])
    n_lm, n_flow = int(targets.sum()), int(fields["denoise"].sum())
    torch.testing.assert_close(logits_i[:n_lm], logits, rtol=0, atol=0)
    torch.testing.assert_close(flow_i[:n_flow], flow, rtol=0, atol=0)
    loss_fn = TransfusionLoss(TransfusionLoss.Config(lm_chunk_rows=8))
    lm_sum, _, _ = model(*args, batch["lm_index"], batch["flow_index"], lm_loss=loss_fn.lm_loss(batch["lm_labels"]))
    torch.testing.assert_close(lm_sum, F.cross_entropy(logits.float(), labels[targets], reduction="sum"))


def step_loss(model, loss_fn, batch, eps_BLC, t_BL, mask, counts):
    """The step from the device batch to the combined loss, as UnimmTrainer runs it (the noise
    is drawn outside: per-row generators are host objects)."""
    latents, denoise = batch["latents"], batch["denoise"]
    z_in = torch.where(denoise[..., None], interpolate(latents, eps_BLC, t_BL[..., None]), latents)
    flow_index = batch["flow_index"]
    lm_sum, flow_pred, balance = model(
        batch["tokens"], z_in, t_BL, batch["modality"], batch["positions"], mask, batch["lm_index"], flow_index,
        lm_loss=loss_fn.lm_loss(batch["lm_labels"]),
    )
    loss_lm, loss_flow = loss_fn.step_parts(
        lm_sum, flow_pred, rows_at(latents, flow_index), rows_at(eps_BLC, flow_index),
        rows_at(t_BL[..., None], flow_index), batch["flow_valid"], counts,
    )
    return loss_fn.combine(loss_lm, loss_flow, balance.mean())


def test_loss_path_compiles_as_one_graph_and_equals_eager_and_the_boolean_path():
    torch._dynamo.reset()
    model = tiny_model()
    loss_fn = TransfusionLoss(TransfusionLoss.Config(lm_chunk_rows=8))
    fields, labels = dense_batch()
    inputs = wire.encode(fields, labels, wire.WireFormat(lm_capacity=0.5, flow_capacity=0.25), PAD)
    batch = wire.to_device(inputs, "cpu")
    g = torch.Generator().manual_seed(3)
    eps, t = torch.randn(B, L, C, generator=g), torch.where(batch["denoise"], torch.rand(B, L, generator=g), 1.0)
    mask = build_attention_mask(batch["document_ids"], batch["frame_ids"], "sdpa")
    counts = inputs["counts"].double() * torch.tensor([1.0, C, 1.0])

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(model, loss_fn, batch, eps, t, mask, counts)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = loss_and_grads(step_loss)
    compiled, compiled_grads = loss_and_grads(torch.compile(step_loss, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and "lm_head.weight" in eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # the boolean-indexed computation it replaces: same loss
    targets, denoise = labels != IGNORE_INDEX, batch["denoise"]
    z_in = torch.where(denoise[..., None], interpolate(batch["latents"], eps, t[..., None]), batch["latents"])
    logits, pred, balance = model(
        batch["tokens"], z_in, t, batch["modality"], batch["positions"], mask, targets, denoise
    )
    loss_lm, loss_flow = loss_fn.parts(
        logits, labels[targets], pred, batch["latents"][denoise], eps[denoise], t[denoise][:, None], counts
    )
    boolean_path = loss_fn.combine(loss_lm, loss_flow, balance.mean())
    torch.testing.assert_close(boolean_path, eager, rtol=1e-5, atol=1e-6, check_dtype=False)


class HostSyncOps(TorchDispatchMode):
    """Records every op whose output shape or value depends on tensor data (torch's
    ``dynamic_output_shape`` and ``data_dependent_output`` tags: nonzero, boolean indexing,
    bincount, .item(), ...; indexing with integer tensors is not one): on CUDA each waits for the device to finish before the host can go
    on. torch 2.13 compiles such ops into one graph (as unbacked sizes), so a fullgraph compile
    alone does not rule them out."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
            # aten.index carries the tag for its boolean form; integer indices fix the shape
            integer_index = func is torch.ops.aten.index.Tensor and not any(
                i is not None and i.dtype == torch.bool for i in args[1]
            )
            if not integer_index:
                self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_step_runs_no_op_that_waits_for_the_device():
    model = tiny_model()
    loss_fn = TransfusionLoss(TransfusionLoss.Config(lm_chunk_rows=8))
    fields, labels = dense_batch()
    inputs = wire.encode(fields, labels, wire.WireFormat(lm_capacity=0.5, flow_capacity=0.25), PAD)
    counts = inputs["counts"].double() * torch.tensor([1.0, C, 1.0])
    with HostSyncOps() as step:
        batch = wire.to_device(inputs, "cpu")
        mask = build_attention_mask(batch["document_ids"], batch["frame_ids"], "sdpa")
        eps, t = torch.randn(B, L, C), torch.where(batch["denoise"], 0.3, 1.0)
        step_loss(model, loss_fn, batch, eps, t, mask, counts).backward()
    assert step.ops == []
    # the check can fail: the boolean-indexed heads it replaces
    with HostSyncOps() as boolean:
        model(
            batch["tokens"], batch["latents"], t, batch["modality"], batch["positions"], mask,
            labels != IGNORE_INDEX, batch["denoise"],
        )
    assert "aten.index.Tensor" in boolean.ops
