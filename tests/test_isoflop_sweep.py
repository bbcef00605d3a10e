"""IsoFLOP sweeps: planning arithmetic and launch scripts, collection from run folders, the fit."""

import json
import math
import shlex

import pytest

from conftest import run_unimm, small_run_options
from unimm.errors import ConfigError
from unimm.model.params import count_params, meta_model
from unimm.scaling import cli, read_runs
from unimm.scaling.collect import Evaluator, HeldOut, RunResult, collect
from unimm.scaling.plan import (
    LOCAL_SCRIPT,
    PLAN_FILE,
    SLURM_SCRIPT,
    SizeRule,
    SlurmOptions,
    SweepSpec,
    plan_sweep,
    read_plan,
    write_plan,
)
from unimm.titan.launch import load_recipe
from unimm.titan.model_size import ModelSize

RULE = SizeRule(d_models=(16, 24, 32, 48), aspect=16, head_dim=8, kv_group=1, ffn_multiple=3)


def test_size_rule():
    size = SizeRule(d_models=(96,), aspect=32, head_dim=16, kv_group=3, ffn_multiple=2.7, ffn_round=8).size(96)
    assert (size.dim, size.n_layers, size.n_heads, size.n_kv_heads, size.ffn_hidden_dim) == (96, 3, 6, 2, 264)
    with pytest.raises(ConfigError, match="head_dim"):
        SizeRule(d_models=(40,), head_dim=16).size(40)


def test_plan_steps_scripts_and_round_trip(tmp_path):
    spec = SweepSpec(
        recipe="debug_sweep",
        budgets=(3e10, 1e11, 3e11),
        sizes=RULE,
        mixture={"text": 0.6, "image_text": 0.4},
        warmup_fraction=0.1,
        min_steps=30,
        overrides=("--dataloader.num_texts", "512"),
    )
    plan = plan_sweep(spec)
    assert plan.tokens_per_step == 8 * 256  # debug_sweep: 8 rows of 256 positions
    # 3e10 FLOPs buys the 48-wide model (115k parameters) 21 steps, fewer than min_steps
    assert [(p.budget, p.d_model) for p in plan.skipped] == [(3e10, 48)]
    assert len(plan.runs) == 11
    for run in plan.runs:
        # D = C / (6N) to within half a step, and the run's C is 6ND with that D
        assert abs(run.tokens - run.budget / (6 * run.params)) <= plan.tokens_per_step / 2
        assert run.tokens == run.steps * plan.tokens_per_step and run.flops == 6 * run.params * run.tokens
        assert run.steps >= 30
        flags = dict(zip(run.overrides[::2], run.overrides[1::2], strict=True))
        assert flags["--training.steps"] == str(run.steps)
        assert flags["--lr_scheduler.warmup_steps"] == str(round(0.1 * run.steps))
        assert flags["--model_size.dim"] == str(run.size.dim)
    # The overrides select the planned model: N from the parsed config is the planned N.
    run = plan.runs[-1]
    config = load_recipe("debug_sweep", list(run.overrides))
    assert config.model_spec.model.dim == run.size.dim and config.model_spec.model.n_layers == run.size.n_layers
    assert count_params(meta_model(config.model_spec.model)).active == run.params
    weights = config.dataloader.source_weights
    assert {name: w for name, w in weights.items() if w} == {"text": 0.6, "image_text": 0.4}
    assert config.training.global_batch_size == 8 and config.dataloader.num_texts == 512

    write_plan(plan, tmp_path, nproc=2, slurm=SlurmOptions(nodes=2, gpus_per_node=4, partition="gpu"))
    assert read_plan(tmp_path / PLAN_FILE) == plan
    local = (tmp_path / LOCAL_SCRIPT).read_text()
    slurm = (tmp_path / SLURM_SCRIPT).read_text()
    assert "#SBATCH --array=0-10" in slurm and "#SBATCH --nodes=2" in slurm and "#SBATCH --partition=gpu" in slurm
    assert "--nproc-per-node 4" in slurm and "-m unimm.titan.train --module unimm.recipes --config debug_sweep" in slurm
    for i, run in enumerate(plan.runs):
        overrides = shlex.join(run.overrides)
        assert f"run {run.name} {run.steps} {overrides}\n" in local
        assert f"  {i}) NAME={run.name}; STEPS={run.steps}; set -- {overrides} ;;\n" in slurm
    assert "unimm train --recipe debug_sweep --nproc 2" in local


def test_plan_rejects_what_it_cannot_run():
    with pytest.raises(ConfigError, match="not resizable"):
        plan_sweep(SweepSpec(recipe="debug_cpu", budgets=(1e11,), sizes=RULE))
    with pytest.raises(ConfigError, match="not in the recipe's data"):
        plan_sweep(SweepSpec(recipe="debug_sweep", budgets=(1e11,), sizes=RULE, mixture={"audio": 1.0}))


def fake_run(sweep, run, losses):
    """A run folder as the trainer leaves it: metrics.jsonl ({step: loss}, None where the loss
    was not finite) and the final checkpoint's folder."""
    folder = sweep / run.name
    (folder / "checkpoint" / f"step-{run.steps}").mkdir(parents=True)
    rows = [{"step": step, "loss": loss} for step, loss in losses.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.slow
def test_collect_evaluates_a_real_run_and_reports_bad_ones(tmp_path, data_cache):
    # Three 16-wide runs of 3, 4 and 5 steps: the first is trained for real, the second never
    # ran, the third's training loss went up.
    rule, options = SizeRule(d_models=(16,), aspect=16, head_dim=8), tuple(small_run_options(data_cache))
    probe = plan_sweep(SweepSpec(recipe="debug_sweep", budgets=(1e10,), sizes=rule, overrides=options))
    step_flops = 6 * probe.runs[0].params * probe.tokens_per_step
    budgets = (3 * step_flops, 4 * step_flops, 5 * step_flops)
    plan = plan_sweep(SweepSpec(recipe="debug_sweep", budgets=budgets, sizes=rule, overrides=options))
    assert [run.steps for run in plan.runs] == [3, 4, 5]
    real, missing, diverged = plan.runs
    result = run_unimm("train", "--recipe", "debug_sweep", "--out", str(tmp_path / real.name), *real.overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fake_run(tmp_path, diverged, {1: 12.0, 3: 9.0, 5: 15.0})

    results = collect(plan, tmp_path, HeldOut(batches=2, timesteps=4), log=lambda line: None)
    assert [r.status for r in results] == ["ok", "missing", "diverged"]
    assert results[2].note == "training loss rose from 12 (step 1) to 15 (step 5)"
    rows = [row for r in results for row in r.rows()]
    assert [(row.run, row.modality) for row in rows[:2]] == [(real.name, "language"), (real.name, "vision")]
    for row in rows[:2]:
        assert math.isfinite(row.loss) and row.loss > 0
        assert row.params == real.params and row.tokens == real.tokens and row.flops == real.flops
        assert 0.5 < float(row.extra["flops_exact"]) / row.flops < 2.0
    assert all(math.isnan(row.loss) for row in rows[2:])
    # A randomly initialised byte model is near log(261) nats; 3 steps do not change that much.
    assert rows[0].loss < 1.2 * math.log(261)


def test_collect_heldout_sets_are_separate_and_can_come_from_folders(tmp_path, data_cache):
    from unimm.data_pipelines import procedural
    from unimm.data_pipelines.encoders import EncoderSpec
    from unimm.data_pipelines.write_shards import write_procedural
    from unimm.scaling.collect import heldout_data
    from unimm.tokenizer import Tokenizer, build_tokenizer

    held = tmp_path / "held"
    write_procedural(held, {"text": 3}, encoder=EncoderSpec("raw_pixels", image_size=32, patch=8),
                     tokenizer=Tokenizer.Config(), seed=7, progress=False)
    config = load_recipe("debug_sweep", list(small_run_options(data_cache)))
    data = heldout_data(config, HeldOut(batches=1, text=str(held), timesteps=2))
    # text from the folder (all 3 of its documents), image-text generated: a batch of each
    tk = build_tokenizer()
    texts = [procedural.text_sample(i, 7)["text"] for i in range(3)]
    assert [d.tokens.tolist() for d in data.text] == [[tk.bos_id, *tk.encode(t), tk.eos_id] for t in texts]
    assert len(data.image_text) == config.training.local_batch_size
    assert all(d.denoise.sum() == 16 and (d.modality[~d.denoise] == 0).all() for d in data.image_text)
    on_shards = load_recipe("debug_sweep", [*small_run_options(data_cache), "--dataloader.shards", str(held)])
    with pytest.raises(ConfigError, match="give held-out shards"):
        heldout_data(on_shards, HeldOut())


def synthetic_loss(run):
    """A Chinchilla-like L(N, D) whose IsoFLOP minima (N = 25k, 44k, 80k at C = 1e11, 3e11,
    1e12) fall inside the 16..48 grid (N = 12k .. 115k)."""
    return 1.0 + 30.0 / run.params**0.3 + 80.0 / run.tokens**0.3


def test_sweep_with_missing_and_diverged_runs_still_fits(tmp_path, monkeypatch, capsys):
    spec = SweepSpec(recipe="debug_sweep", budgets=(1e11, 3e11, 1e12), sizes=RULE)
    plan = plan_sweep(spec)
    write_plan(plan, tmp_path)
    missing, diverged = plan.runs[1], plan.runs[6]  # two budgets lose one of their 4 sizes
    for run in plan.runs:
        if run is diverged:
            fake_run(tmp_path, run, {1: 11.0, 10: None})
        elif run is not missing:
            fake_run(tmp_path, run, {1: 11.0, 10: 6.0, run.steps: 5.0})

    def evaluate(self, run, recipe, run_dir):  # held-out losses without weights: the fit is under test
        return RunResult(run, "ok", "", synthetic_loss(run), 0.5 * synthetic_loss(run), 6.1 * run.params * run.tokens)

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    assert cli.main(["collect", "--plan", str(tmp_path / PLAN_FILE)]) == 0
    out = capsys.readouterr().out
    assert f"not usable: {missing.name} (missing" in out and f"not usable: {diverged.name} (diverged" in out
    table = read_runs(tmp_path / "runs.csv")
    assert len(table) == 2 * len(plan.runs)

    assert cli.main(["fit", "--csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "fits"), "--bootstrap", "50"]) == 0
    report = json.loads((tmp_path / "fits" / "fits.json").read_text())
    for modality in ("language", "vision"):
        group = report["groups"][modality]
        assert len(group["budgets"]) == 3 and math.isfinite(group["a"]) and group["E"] is not None
        dropped = {tuple(item["runs"]): item["reason"] for item in group["dropped"]}
        assert dropped == {
            (missing.name,): f"marked status=missing: no run folder {tmp_path / missing.name}",
            (diverged.name,): "marked status=diverged: training loss not finite at step 10",
        }


def test_model_size_keeps_moe_granularity():
    # moe_e32: 32 experts of width 512 beside a dense-equivalent FFN of 8192 (G = 16)
    model = load_recipe("moe_e32").model_spec.model
    resized = ModelSize(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_hidden_dim=4096).apply(model)
    assert (resized.dim, resized.n_layers, resized.ffn.hidden_dim) == (1024, 8, 4096)
    assert (resized.ffn.moe.expert_hidden_dim, resized.ffn.moe.num_experts) == (256, 32)
    assert model.dim == 2048 and model.ffn.moe.expert_hidden_dim == 512  # the recipe's config is not changed
