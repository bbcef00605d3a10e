"""The MoE recipe through `unimm train`: it learns, and expert parallelism matches 1 process."""

import json

import pytest

from conftest import losses, needs_expert_parallel_torch, train_recipe

pytestmark = pytest.mark.slow


def train(out, cache, *extra, steps, nproc=1):
    return train_recipe("debug_cpu_moe", out, cache, *extra, steps=steps, nproc=nproc)


@needs_expert_parallel_torch
def test_expert_parallel_over_two_processes_matches_one(tmp_path, data_cache):
    seed = tmp_path / "seed"
    train(seed, data_cache, "--checkpoint.create_seed_checkpoint", steps=1)
    same = ["--checkpoint.initial_load_path", str(seed / "checkpoint" / "step-0"),
            "--checkpoint.initial_load_model_only", "--dataloader.num_streams", "2"]
    one, ep = tmp_path / "one", tmp_path / "ep"
    train(one, data_cache, *same, steps=4)
    result = train(ep, data_cache, *same, "--training.local_batch_size", "2",
                   "--parallelism.expert_parallel_degree", "2", steps=4, nproc=2)
    assert "ep=2" in result.stdout + result.stderr
    a, b = losses(one), losses(ep)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        # experts see their tokens in another order after the all-to-all: fp32 summation order
        assert b[step] == pytest.approx(a[step], rel=2e-4), step


def test_moe_recipe_learns_and_logs_expert_load(tmp_path, data_cache):
    out = tmp_path / "moe"
    train(out, data_cache, "--lr_scheduler.warmup_steps", "5", steps=30)
    lm = losses(out, "loss_lm")
    assert sum(lm[s] for s in (28, 29, 30)) < 0.6 * sum(lm[s] for s in (1, 2, 3))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.5 < r["moe/balance_loss"] < 4 for r in rows)
    assert all(1.0 <= r["moe/layer0/max_load"] <= 8.0 for r in rows)
    loads = [json.loads(line) for line in (out / "expert_load.jsonl").read_text().splitlines()]
    # 4 layers x 8 experts; each step counts 2 experts for every position of 4 rows x 256
    # but the padding (data/padding_positions is cumulative), which the router leaves out
    assert len(loads) == 30 and all(len(layer) == 8 for layer in loads[0]["tokens_per_expert"])
    by_step = {r["step"]: r for r in rows}
    padding = by_step[30]["data/padding_positions"] - by_step[29]["data/padding_positions"]
    assert padding > 0, "debug rows carry padding"
    assert all(sum(layer) == (4 * 256 - padding) * 2 for layer in loads[-1]["tokens_per_expert"])
