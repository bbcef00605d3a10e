"""Faults a long run meets: non-finite steps, SIGKILL mid-step and mid-checkpoint, a damaged
newest checkpoint, a torn metrics line (docs/reliability.md).

Training runs start ``tests/fault_injection.py`` (the trainer's entry point with faults
injected) as one process without torchrun, to keep each run to start-up plus a few steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import losses, small_run_options
from unimm.titan.metrics_jsonl import JsonlLogger, drop_rows_after, read_metrics

TESTS = Path(__file__).parent
ROOT = TESTS.parent


# -- helpers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(out: Path, cache: Path, *extra: str, steps: int, faults: dict | None = None, nproc: int = 1):
    """The debug_cpu recipe (small_run_options) on ``out``; returns (returncode, output)."""
    args = [
        "--module", "unimm.recipes", "--config", "debug_cpu", "--dump_folder", str(out),
        "--training.steps", str(steps), *small_run_options(cache), *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "UNIMM_FAULTS": json.dumps(faults or {}),
        "OMP_NUM_THREADS": "1",
    }
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        cmd = [sys.executable, "-m", "fault_injection", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fault_injection", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    return result.returncode, result.stdout + result.stderr


def ok(result) -> str:
    rc, output = result
    assert rc == 0, output[-4000:]
    return output


def load_checkpoint(folder: Path) -> dict:
    """Every entry of a DCP checkpoint folder, read in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def tensors(state, prefix="") -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        for key, value in state.items():
            out.update(tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            out.update(tensors(value, f"{prefix}.{i}"))
    return out


def assert_all_finite(folder: Path) -> dict[str, torch.Tensor]:
    found = tensors(load_checkpoint(folder))
    assert found, folder
    bad = [name for name, t in found.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{folder} holds non-finite tensors: {bad[:10]}"
    return found


def steps_logged(run: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run / "metrics.jsonl")]


CHAIN = ["--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0", "--metrics.log_freq", "2"]
"""Checkpoints at even steps, all kept; metrics at 1 and even steps, so the odd steps after 1
read their next batch ahead (UnimmTrainer._read_ahead) and exact resume covers that too."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> Path:
    """An uninterrupted 8-step run, the curve every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    ok(run_training(out, data_cache, *CHAIN, steps=8))
    return out


# -- unit tests: no training run ----------------------------------------------------------


def test_torn_metrics_line_is_skipped_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss": 0.1')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    drop_rows_after(path, 2)  # resuming from the checkpoint of step 2
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])

    # the logger's own first write after a resume also rewrites the file whole
    path.write_text(path.read_text() + '{"step": 3, "lo')

    class Null:
        def log(self, metrics, step): ...

    JsonlLogger(path, world_size=1, passthrough=Null()).log({"throughput(tps)": 1.0, "loss_metrics/global_avg_loss": 2.0}, 3)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 2.0)]


class _TrainState:
    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _manager(folder: Path):
    """The trainer's checkpoint manager around a small model, in this process (no dist)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    from unimm.titan.checkpoint import UnimmCheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizers = default_adamw(lr=1e-2).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=10)
    train_state = _TrainState()
    # what the recipes build, adopted as UnimmTrainer does
    config = UnimmCheckpointManager.adopt(
        CheckpointManager.Config(enable=True, interval=1, keep_latest_k=0, last_save_model_only=False)
    )
    manager = config.build(
        dataloader=_TrainState(), model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": train_state}, sd_adapter=None, base_folder=str(folder),
    )
    assert type(manager) is UnimmCheckpointManager
    return manager, model, optimizers, train_state


def _train_and_save(manager, model, optimizers, train_state, steps):
    for step in steps:
        model(torch.randn(3, 4)).sum().backward()
        optimizers.step()
        optimizers.zero_grad()
        train_state.step = step
        manager.save(step)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoint_with_nonfinite_value_is_not_written(tmp_path):
    from unimm.titan.checkpoint import NonFiniteCheckpointError

    manager, model, optimizers, train_state = _manager(tmp_path)
    _train_and_save(manager, model, optimizers, train_state, [1])
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"step-2.*1\.bias"):
        _train_and_save(manager, model, optimizers, train_state, [2])
    with torch.no_grad():
        model[1].bias[0] = 0.0
    next(iter(optimizers.optimizers[0].state.values()))["exp_avg_sq"].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"optimizer\.state\.0\.weight\.exp_avg_sq"):
        manager.save(3)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-1"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_checkpoint_is_set_aside_and_the_previous_one_loaded(tmp_path, caplog):
    from unimm.titan.checkpoint import DamagedCheckpointError, checkpoint_problem

    manager, model, optimizers, train_state = _manager(tmp_path)
    _train_and_save(manager, model, optimizers, train_state, [1, 2, 3, 4])
    folder = tmp_path / "checkpoint"
    assert checkpoint_problem(folder / "step-4") is None
    data = folder / "step-4" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size - 100)  # data cut short, .metadata intact
    assert "__0_0.distcp holds" in checkpoint_problem(folder / "step-4")
    # same size, bytes destroyed: only the load notices (a data-corruption error, not a config one)
    garbage = folder / "step-3" / "__0_0.distcp"
    garbage.write_bytes(b"\0" * garbage.stat().st_size)
    (folder / "step-5").mkdir()  # a save killed before its .metadata: torchtitan skips it

    manager, model, optimizers, train_state = _manager(tmp_path)
    with caplog.at_level("WARNING"):
        assert manager.load()
    assert train_state.step == 2
    assert f"checkpoint {folder / 'step-4'} is damaged" in caplog.text
    assert f"moved it to {folder / 'damaged' / 'step-4'}" in caplog.text
    assert f"checkpoint {folder / 'step-3'} is damaged (loading it failed)" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["damaged", "step-1", "step-2", "step-5"]
    assert sorted(p.name for p in (folder / "damaged").iterdir()) == ["step-3", "step-4"]

    # nothing intact left: stop and say so, move nothing (a fresh start must be a decision)
    for name in ("step-1", "step-2"):
        os.truncate(folder / name / "__0_0.distcp", 10)
    manager, *_ = _manager(tmp_path)
    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint"):
        manager.load()
    assert (folder / "step-1").is_dir() and (folder / "step-2").is_dir()


# -- training runs --------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, data_cache):
    # step 3 alone, then 5 in a row from step 5: the limit (5) stops the run at step 9
    out = tmp_path / "nan"
    rc, output = run_training(
        out, data_cache, "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
        steps=12, faults={"poison_steps": [3, 5, 6, 7, 8, 9]},
    )
    assert rc != 0
    assert "NonFiniteLossError: stopping at step 9: 5 consecutive steps (5-9)" in output
    for step in range(5, 10):
        assert f"step {step}: loss nan (lm nan, flow nan, balance 0)" in output
    assert re.search(r"step 9: .*batch rank 0: \S+\.tar keys [\w-]+", output)  # the batch's shards and keys
    assert "skipped step 3:" in output and "(1 in a row" in output

    rows = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, 9))  # step 9 stopped before its log
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None
    assert all(math.isfinite(rows[s]["loss"]) for s in (1, 2, 4))
    assert [rows[s]["train/skipped_nonfinite_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 2, 3, 4, 5]
    assert rows[5]["lr"] == rows[6]["lr"] == rows[8]["lr"]  # no LR step on a skipped step
    assert len(read_metrics(out / "nonfinite_steps.jsonl")) == 6

    checkpoints = out / "checkpoint"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4", "step-6", "step-8"]
    states = {name: assert_all_finite(checkpoints / name) for name in ("step-2", "step-4", "step-6", "step-8")}
    # steps 5-8 were skipped: weights, optimizer state and LR schedule are step 4's
    changed = [k for k, t in states["step-4"].items() if not torch.equal(t, states["step-8"][k])]
    assert changed == [], changed
    assert not all(torch.equal(t, states["step-4"][k]) for k, t in states["step-2"].items())


def test_sigkill_mid_step_and_mid_checkpoint_then_damaged_checkpoint_resume_exactly(tmp_path, data_cache, reference):
    run = tmp_path / "run"
    # 1. killed inside step 5 (after its backward, before its optimizer step)
    rc, output = run_training(run, data_cache, *CHAIN, steps=8, faults={"kill_in_step": 5})
    assert rc != 0 and "Training starts at step 1" in output
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["step-2", "step-4"]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 7.')  # and the metrics line being written was torn

    # 2. resumes from step 4; killed while writing checkpoint step-6 (data cut short, no .metadata)
    rc, output = run_training(run, data_cache, *CHAIN, steps=8, faults={"kill_in_checkpoint": 6})
    assert rc != 0 and "Training starts at step 5" in output, output[-3000:]
    assert not (run / "checkpoint" / "step-6" / ".metadata").exists()
    assert steps_logged(run) == [1, 2, 4, 6]

    # 3. the newest complete checkpoint, step-4, loses data too: resume from step-2 instead
    data = run / "checkpoint" / "step-4" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 3)
    output = ok(run_training(run, data_cache, *CHAIN, steps=8))
    assert f"checkpoint {run / 'checkpoint' / 'step-4'} is damaged (__0_0.distcp holds" in output
    assert f"moved it to {run / 'checkpoint' / 'damaged' / 'step-4'}" in output
    assert "Training starts at step 3" in output

    assert steps_logged(run) == steps_logged(reference) == [1, 2, 4, 6, 8], "each step once"
    for key in ("loss", "loss_lm", "loss_flow", "grad_norm"):
        want, got = losses(reference, key), losses(run, key)
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-9), (key, step)
    final = tensors(load_checkpoint(run / "checkpoint" / "step-8"))
    expected = tensors(load_checkpoint(reference / "checkpoint" / "step-8"))
    assert sorted(final) == sorted(expected)
    assert [k for k in expected if not torch.equal(final[k], expected[k])] == []  # bitwise


@pytest.mark.slow
def test_two_ranks_skip_the_same_steps_when_one_rank_has_nan(tmp_path, data_cache):
    out = tmp_path / "two"
    rc, output = run_training(
        out, data_cache, "--training.local_batch_size", "2", "--checkpoint.interval", "4",
        "--max_consecutive_nonfinite_steps", "2", steps=6, nproc=2,
        faults={"poison_steps": [2, 4, 5], "poison_ranks": [1]},
    )
    assert rc != 0 and "stopping at step 5: 2 consecutive steps (4-5)" in output, output[-3000:]
    rows = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert rows[2]["loss"] is None and rows[3]["loss"] is not None
    assert rows[4]["train/skipped_nonfinite_steps"] == 2
    records = read_metrics(out / "nonfinite_steps.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5] and all(len(r["batch"]) == 2 for r in records)
    assert_all_finite(out / "checkpoint" / "step-4")
