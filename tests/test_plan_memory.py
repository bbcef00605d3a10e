"""``unimm plan-memory``: the real parallelize function on a meta model in a fake process group."""

from __future__ import annotations

import json

import pytest

from unimm.cli import main
from conftest import needs_expert_parallel_torch


def _report(capsys, *argv: str) -> dict:
    assert main(["plan-memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_debug_cpu_on_4_gpus_matches_a_hand_count(capsys):
    r = _report(capsys, "--recipe", "debug_cpu", "--gpus", "4")
    assert r["layout"] == {
        "gpus": 4, "gpus_per_node": 4, "dp_replicate": 1, "dp_shard": 4, "ep": 1, "efsdp": None, "nodes": 1,
    }
    # debug_cpu: V=261, D=128, 4 layers, 4 heads (head 32), 2 kv heads (Dkv 64), SwiGLU H=384,
    # latent 192, time freq 256; every parameter fp32, FSDP2 Shard(0) over 4 ranks, rank 0 keeps
    # ceil(rows / 4) rows (261 rows -> 66: FSDP2 pads to that on every rank).
    embeddings = 66 * 128  # tok_embeddings [261, 128]
    adapters = (32 * 192 + 32) + (64 * 256 + 64) + (32 * 256 + 32)  # latent_proj, time MLP in, out
    layer = 32 + 32 * 128 + 16 * 128 + 16 * 128 + 32 * 128 + 32 + 3 * 96 * 128  # norms, wq wk wv wo, w1 w3 [384,128], w2 [128,384]
    assert layer == 49_216
    heads = 32 + 66 * 128 + (48 * 128 + 48)  # final norm, lm_head [261, 128], flow_head [192, 128] + bias
    local = embeddings + adapters + 4 * layer + heads
    assert local == 250_832
    assert r["total_params"] == 1_002_560
    assert r["local_params"] == local
    assert r["params_bytes"] == local * 4 == 1_003_328
    assert r["grads_bytes"] == 1_003_328
    assert r["optimizer_bytes"] == 2 * 1_003_328 + 4 * 47  # exp_avg + exp_avg_sq, one fp32 step per tensor (7 + 4 x 9 + 4 tensors)
    assert r["master_weights_bytes"] == 0  # the fp32 shards are the master weights
    assert r["buffers_bytes"] == 512 * 16 * 8  # RoPE cache [max_seq_len 512, 16] complex64
    assert r["exact_state_bytes"] == 1_003_328 * 4 + 4 * 47 + 65_536
    # rank 0's shard is the padded maximum: 192 elements over an even split (two [261, 128] tables)
    assert r["local_params"] * 4 - r["total_params"] == 2 * (66 * 4 - 261) * 128

    # activations, fp32 (a = 4), T = 8 x 256 = 2048 tokens per GPU, 4 layers
    T, a = 2048, 4
    attn_none = (128 + 128 + (128 + 2 * 64) + (128 + 64) + 128) * a + 4 * 4  # + fp32 lse per head
    ffn_none = (2 * 128 + 4 * 384) * a
    layer_none = attn_none + ffn_none
    assert layer_none == 10_512
    # final norm; LM target rows (half the positions) saved; one 1024-row chunk of logits, fp32 copy, gradient
    outside = (T + T // 2) * 128 * a + 1024 * 261 * (a + 8)
    attn_sel = (128 + 128 + 64 + 128) * a + 4 * 4  # block input, wq, wv, attention output, lse
    ffn_sel = (384 + 128) * a  # w1, w2
    acts = r["activations_bytes_estimate"]
    assert acts["none"] == 4 * layer_none * T + outside == 90_894_336
    assert acts["selective"] == 4 * (attn_sel + ffn_sel) * T + outside == 36_368_384
    assert acts["full"] == 4 * 128 * a * T + layer_none * T + outside == 30_502_912
    assert r["recipe_ac"] == "none"
    assert r["total_bytes_estimate"]["none"] == r["exact_state_bytes"] + r["fsdp_transient_bytes_estimate"] + acts["none"]


@needs_expert_parallel_torch
def test_debug_moe_hsdp_with_expert_parallel_matches_a_hand_count(capsys):
    r = _report(
        capsys, "--recipe", "debug_cpu_moe", "--gpus", "4", "--gpus-per-node", "2",
        "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.expert_parallel_degree", "2",
    )
    assert r["layout"] == {
        "gpus": 4, "gpus_per_node": 2, "dp_replicate": 2, "dp_shard": 2, "ep": 2, "efsdp": 1, "nodes": 2,
    }
    # debug_cpu_moe: debug_cpu's backbone with 8 SwiGLU experts of width 96 (top-2) and a router
    # [8, 128] per layer. HSDP: every dense parameter Shard(0) over the 2 GPUs of a node
    # (replicated over the 2 nodes); experts Shard(0) over ep 2 (4 each), efsdp 1: whole.
    embeddings = 131 * 128  # ceil(261 / 2) rows
    adapters = (64 * 192 + 64) + (128 * 256 + 128) + (64 * 256 + 64)  # latent_proj, time MLP in, out
    experts = 3 * 4 * 128 * 96  # w1, w3 [4, 128, 96], w2 [4, 96, 128]
    dense_layer = 64 + 64 + 64 * 128 + 32 * 128 + 32 * 128 + 64 * 128 + 4 * 128  # norms, wq wk wv wo, router
    heads = 64 + 131 * 128 + (96 * 128 + 96)  # final norm, lm_head, flow_head
    local = embeddings + adapters + 4 * (dense_layer + experts) + heads
    assert r["local_params"] == local == 798_368
    layer_full = 256 + 2 * 128 * 128 + 2 * 64 * 128 + 8 * 128 + 3 * 8 * 128 * 96
    assert r["total_params"] == 4 * layer_full + 2 * 261 * 128 + 128 + (192 * 128 + 192) + (192 * 128 + 128) + (256 * 256 + 256) + (128 * 256 + 128)
    assert r["params_bytes"] == r["grads_bytes"] == 4 * local
    assert r["optimizer_bytes"] == 2 * 4 * local + 4 * 51  # 7 root + 4 x 10 + 4 head tensors
    # RoPE [512, 16] complex64; expert_bias and tokens_per_expert, 8 fp32 each, per layer
    assert r["buffers_bytes"] == 512 * 16 * 8 + 4 * 2 * 8 * 4
    # the largest unit is a block: its dense part all-gathered over the node, its 4 local experts
    assert r["fsdp_largest_unit"].startswith("layers.")
    assert r["fsdp_largest_unit_params"] == 256 + 2 * 128 * 128 + 2 * 64 * 128 + 8 * 128 + experts
    assert r["fsdp_transient_bytes_estimate"] == r["fsdp_largest_unit_params"] * (2 * 4 + 4)  # fp32 params and reduce
    # activations, fp32, T = 2048 tokens, 4 layers; MoE: k = 2, He = 96, E = 8 routed
    T, a = 2048, 4
    attn_none = (128 + 128 + (128 + 2 * 64) + (128 + 64) + 128) * a + 4 * 4
    moe_none = (2 * 128 + 2 * 128 + 4 * 2 * 96 + 2 * 128) * a + 2 * 8 * 4  # norm in/out, copies, expert inner, outputs; router fp32
    attn_sel = (128 + 128 + 64 + 128) * a + 4 * 4
    moe_sel = (8 + 2 + 2 * 2 * 96 + 2 * 128) * a + 2 * 8  # router logits, top-k values, grouped GEMM outputs; int64 top-k ids
    outside = (T + T // 2) * 128 * a + 1024 * 261 * (a + 8)
    acts = r["activations_bytes_estimate"]
    assert acts["none"] == 4 * (attn_none + moe_none) * T + outside == 83_030_016
    assert acts["selective"] == 4 * (attn_sel + moe_sel) * T + outside == 41_021_440
    assert acts["full"] == 4 * 128 * a * T + (attn_none + moe_none) * T + outside == 28_536_832


def test_dense_1b5_on_128_gpus_is_hsdp_16_x_8(capsys):
    r = _report(capsys, "--recipe", "dense_1b5", "--gpus", "128", "--gpus-per-node", "8")
    # the recipe's own layout, derived from the job: replicate across the 16 nodes, shard within 8
    assert r["layout"] == {
        "gpus": 128, "gpus_per_node": 8, "dp_replicate": 16, "dp_shard": 8, "ep": 1, "efsdp": None, "nodes": 16,
    }
    assert 1.45e9 < r["total_params"] < 1.55e9
    assert r["total_params"] <= r["local_params"] * 8 <= r["total_params"] * 1.001
    assert r["params_bytes"] == 4 * r["local_params"] and r["optimizer_bytes"] >= 2 * r["params_bytes"]
    acts = r["activations_bytes_estimate"]
    assert acts["full"] < acts["selective"] < acts["none"]
    assert r["seq_len"] == 4096 and r["recipe_ac"] == "selective"
    assert r["total_bytes_estimate"]["selective"] < 80 * 2**30


@needs_expert_parallel_torch
def test_moe_e1008_on_64_gpus_is_expert_parallel_8_x_8(capsys):
    r = _report(capsys, "--recipe", "moe_e1008", "--gpus", "64")
    # the recipe's own layout: FSDP over the 64 GPUs, experts over ep 8 (inside a node) x efsdp 8
    assert r["layout"] == {
        "gpus": 64, "gpus_per_node": 8, "dp_replicate": 1, "dp_shard": 64, "ep": 8, "efsdp": 8, "nodes": 8,
    }
    assert r["total_params"] > 50e9
    # experts: 1008 / 8 = 126 per EP rank, 15.75 per efsdp rank, padded to 16: within 2%
    assert r["total_params"] <= r["local_params"] * 64 <= r["total_params"] * 1.02
    assert r["fsdp_largest_unit"].startswith("layers.")  # a block: its 126 local experts gathered over efsdp
    assert r["exact_state_bytes"] < 20 * 2**30
    assert r["seq_len"] == 4096 and set(r["activations_bytes_estimate"]) == {"none", "selective", "full"}


def test_table_output(capsys):
    assert main(["plan-memory", "--recipe", "debug_cpu", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "per GPU, exact:" in out and "ESTIMATE" in out and "selective" in out


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--recipe", "debug_cpu", "--gpus", "4", "--parallelism.data_parallel_replicate_degree", "3"],
         "--parallelism.data_parallel_replicate_degree 3"),
        (["--recipe", "debug_cpu", "--gpus", "4", "--parallelism.data_parallel_shard_degree", "3"],
         "--parallelism.data_parallel_shard_degree 3"),
        (["--recipe", "debug_cpu_moe", "--gpus", "12", "--parallelism.expert_parallel_degree", "3"],
         "moe.num_experts 8"),
        (["--recipe", "debug_cpu_moe", "--gpus", "4", "--parallelism.expert_parallel_degree", "8"],
         "--parallelism.expert_parallel_degree 8"),
        (["--recipe", "debug_cpu", "--gpus", "4", "--parallelism.expert_parallel_degree", "2"],
         "needs a recipe with MoE layers"),
        (["--recipe", "debug_cpu", "--gpus", "12", "--gpus-per-node", "8"], "--gpus-per-node 8"),
        (["--recipe", "debug_cpu", "--gpus", "4", "--parallelism.tensor_parallel_degree", "2"],
         "--parallelism.tensor_parallel_degree 2"),
    ],
)
def test_impossible_layouts_exit_2_naming_the_setting(capsys, argv, named):
    assert main(["plan-memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unimm: error:") and named in err and "\n" not in err
