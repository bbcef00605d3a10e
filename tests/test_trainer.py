"""The trainer end to end through `unimm train` (torchrun, torchtitan, DCP checkpoints)."""

import pytest

from conftest import losses, train_recipe

pytestmark = pytest.mark.slow


def train(out, cache, *extra, steps=8, nproc=1):
    return train_recipe("debug_cpu", out, cache, *extra, steps=steps, nproc=nproc)


def test_two_processes_match_one_and_resume_continues_the_curve(tmp_path, data_cache):
    # torchtitan's way to start differently parallelised runs from identical weights: a seed
    # checkpoint written by one process, loaded (model only) by each run.
    seed = tmp_path / "seed"
    train(seed, data_cache, "--checkpoint.create_seed_checkpoint", steps=1)
    same_init = ["--checkpoint.initial_load_path", str(seed / "checkpoint" / "step-0"),
                 "--checkpoint.initial_load_model_only", "--dataloader.num_streams", "2"]
    # Same global batch (4 rows from 2 data streams) on 1 process and on 2 FSDP ranks.
    one = tmp_path / "one"
    train(one, data_cache, *same_init)
    two = tmp_path / "two"
    train(two, data_cache, *same_init, "--training.local_batch_size", "2", nproc=2)
    for key in ("loss", "loss_lm", "loss_flow"):
        a, b = losses(one, key), losses(two, key)
        assert sorted(a) == sorted(b) == list(range(1, 9))
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=2e-4), (key, step)

    # Stop after 4 of 8 steps (same LR schedule), then run again on the same folder.
    resumed = tmp_path / "resumed"
    train(resumed, data_cache, *same_init, "--lr_scheduler.total_steps", "8", steps=4)
    assert (resumed / "checkpoint" / "step-4").is_dir()
    result = train(resumed, data_cache, *same_init)
    assert "Training starts at step 5" in result.stdout + result.stderr  # loaded step-4
    a, b = losses(one), losses(resumed)
    assert sorted(b) == list(range(1, 9)), "metrics.jsonl continues, no step twice"
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


def test_losses_fall(tmp_path, data_cache):
    out = tmp_path / "run"
    train(out, data_cache, "--lr_scheduler.warmup_steps", "5", steps=40)
    lm, flow = losses(out, "loss_lm"), losses(out, "loss_flow")
    first, last = range(1, 4), range(36, 41)
    mean = lambda d, steps: sum(d[s] for s in steps) / len(steps)  # noqa: E731
    assert mean(lm, last) < 0.6 * mean(lm, first)
    assert mean(flow, last) < 0.9 * mean(flow, first)
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "checkpoint" / "step-40").is_dir()
    # perf/* metrics (unimm.titan.step_metrics) on every logged row; CPU: no MFU, never a guessed peak
    from unimm.titan.metrics_jsonl import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    assert rows
    for row in rows:
        assert row["perf/mfu"] is None and row["mfu_pct"] is None, row["step"]
        assert row["perf/tokens_per_s_per_device"] == row["tokens_per_s_per_device"] > 0
        assert row["perf/flops_per_token"] > 0 and row["perf/peak_memory_gib"] > 0
        assert row["perf/data_wait_s"] >= 0 and 0 <= row["perf/data_wait_share"] <= 1
        assert 0 <= row["perf/mask_build_s"] < row["step_time_s"]
