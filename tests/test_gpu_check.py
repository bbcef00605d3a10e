"""tools/gpu_check.py: the GPU validation script, exercised on CPU in its dry mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402


def _run(out: Path, *args: str, timeout: int = 2400) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), str(out), "--dry-run", *args],
        capture_output=True, text=True, timeout=timeout, env={**__import__("os").environ, "PYTHON": sys.executable},
    )


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"))
    sections = report["sections"]
    parity = sections["kernel_parity"]["result"]
    assert parity["passed"] and {c["name"] for c in parity["cases"]} == {"fine_g16", "e1008", "modality_e2", "skewed_empty"}
    assert {c["variant"] for c in parity["cases"]} == {
        "triton", "triton_tma", "triton_no_tma", "triton_unfused_gate_up", "triton_split2"}
    assert any(c["empty_experts"] > 0 for c in parity["cases"])
    assert sections["kernel_compile"]["result"]["passed"]
    timing = sections["kernel_timing"]["result"]
    assert {r["backend"] for r in timing["rows"]} == {
        "dense matmul", "torch_grouped_mm", "triton", "triton_tma", "triton_no_tma", "triton_unfused_gate_up",
        "triton_split2", "triton_split1"}
    # the policy's table: one entry per shape key (fine_g16 and skewed_empty share one), loadable
    from unimm.kernels.policy import load_table

    table = load_table(tmp_path / "backend_table.json")
    assert len(table) == 1 and all(k.startswith("swiglu/") for k in table)  # dry: one timed shape
    assert (tmp_path / "tables" / "cpu.json").is_file()
    assert "## Backend table" in (tmp_path / "gpu_check.md").read_text()
    assert sections["attention"]["result"]["parity"]["passed"]
    for name in ("train_dense", "train_modality", "train_moe"):
        metrics = sections[name]["result"]["metrics"]
        assert metrics["last_step"] == 2 and "tokens_per_s_per_device" in metrics
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| field | value |" in md and "| device | cpu |" in md and "gpu_check.sh" in md
    assert "## Kernel parity" in md and "## Training" in md
    assert "## Targets" in md and "## Profile: modality_e2 fwd+bwd, triton" in md
    profile = timing["profiles"]["triton"]
    # the top ops hold most of the profiled time, and no more than all of it
    assert profile and 0.5 <= sum(k["share"] for k in profile) <= 1 + 1e-9 and all(k["ms"] > 0 for k in profile)
    assert len(report["targets"]) == 8


def test_markdown_gives_the_e1008_over_e32_ratio_and_the_autotuned_configs():
    rows = [dict(layer=layer, routing="uniform", backend=backend, ms=ms, tflops=1.0, peak_mib=None)
            for layer, backend, ms in (("e1008", "triton", 6.0), ("e32", "triton", 5.0),
                                       ("e1008", "torch_grouped_mm", 9.0), ("e32", "torch_grouped_mm", 6.0))]
    chosen = {"fwd/tma-auto": {"(262144, 512, 2048, 1008, True, False)": "BLOCK_M: 128, WEIGHT_TMA: True"}}
    timing = dict(iters=10, timer="cuda events", rows=rows, backend_table=[], tuned_configs=chosen)
    report = {"environment": {}, "sections": {"kernel_timing": dict(status="ok", seconds=1.0, budget_s=75, result=timing)}}
    md = gpu_check.markdown(report)
    assert "E=1008 over E=32 at equal active compute (target <= 1.2x): torch_grouped_mm: 1.5x, triton: 1.2x" in md
    assert "| fwd/tma-auto | `(262144, 512, 2048, 1008, True, False)` | `BLOCK_M: 128, WEIGHT_TMA: True` |" in md


def test_targets_against_hand_computed_margins():
    def row(layer, backend, ms):
        return dict(layer=layer, routing="uniform", backend=backend, ms=ms)

    timing = dict(rows=[row("fine_g16", "triton", 10.0), row("fine_g16", "torch_grouped_mm", 14.0),
                        row("fine_g16", "dense matmul", 5.0), row("e1008", "triton", 6.0),
                        row("e1008", "torch_grouped_mm", 9.0), row("e32", "triton", 5.0), row("e32", "torch_grouped_mm", 6.0)])
    attention = dict(timings={"flex_hybrid": {"ms": 12.0}, "flex_causal": {"ms": 10.0}}, flex_vs_sdpa=2.5)
    dense = dict(metrics={"perf/mfu": {"last": 0.41, "median_after_first": 0.40}})
    sections = {"kernel_timing": dict(status="ok", result=timing), "attention": dict(status="ok", result=attention),
                "train_dense": dict(status="ok", result=dense), "train_moe": dict(status="error", error="boom")}
    got = {t["target"].split(",")[0].split(" (")[0]: t for t in gpu_check.targets(sections)}
    expect = {  # measured, margin (None: not measured)
        "Triton fwd+bwd over torch._grouped_mm": (1.4, 1.4 / 1.3 - 1),
        "Triton fwd+bwd vs a dense matmul of equal FLOPs": (0.5, 0.5 / 0.6 - 1),
        "Hybrid-mask FlexAttention time over pure causal": (1.2, 1.3 / 1.2 - 1),
        "Dense-mask SDPA time over hybrid-mask FlexAttention": (2.5, 0.25),
        "MFU": None,  # three MFU rows share this prefix: checked below
        "MoE layer time at E=1008 over E=32": (6.0 / 5.0, 1.2 / 1.2 - 1),  # the faster backend at each E
    }
    for name, (measured, margin) in ((k, v) for k, v in expect.items() if v):
        t = got[name]
        assert t["measured"] == pytest.approx(measured) and t["margin"] == pytest.approx(margin), t
        assert t["met"] == (margin >= -1e-12)
    mfu = [t for t in gpu_check.targets(sections) if t["target"].startswith("MFU")]
    assert [t["measured"] for t in mfu] == [0.40, None, None]  # modality not run, moe failed
    assert mfu[0]["met"] is False and mfu[0]["margin"] == pytest.approx(0.40 / 0.45 - 1)
    table = gpu_check.targets_table(sections)
    assert "| MFU, dense_1b5 | >= 0.45 | 0.4 | no | -11% |" in table
    assert "| MFU, moe_e256 (shortened depth) | >= 0.3 | - | - | not measured |" in table


def test_failing_section_is_recorded_and_the_run_goes_on(tmp_path):
    result = _run(tmp_path, "--sections", "kernel_parity,kernel_compile", "--fail-section", "kernel_parity")
    assert result.returncode == 1  # not every section ok
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed, after = report["sections"]["kernel_parity"], report["sections"]["kernel_compile"]
    assert failed["status"] == "error" and "injected failure" in failed["error"]
    assert after["status"] == "ok"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| kernel_parity | error |" in md and "| kernel_compile | ok |" in md


def test_global_timeout_skips_the_rest(tmp_path):
    report = {"environment": {}, "sections": {}}
    args = gpu_check.parse_args([str(tmp_path), "--dry-run", "--timeout", "1", "--sections", "attention,train_dense"])
    assert args.timeout == 1
    rc = gpu_check.main([str(tmp_path), "--dry-run", "--timeout", "1", "--sections", "attention,train_dense"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}


def test_summarize_metrics_tolerates_missing_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0, "tokens_per_s_per_device": 10.0, "mfu_pct": None},
            {"step": 2, "loss": 2.0, "tokens_per_s_per_device": 30.0, "perf/data_wait_s": 0.1, "data/rows": 4}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = gpu_check.summarize_metrics(path)
    assert summary["last_step"] == 2
    assert summary["tokens_per_s_per_device"]["median_after_first"] == 30.0
    assert summary["perf/data_wait_s"]["last"] == 0.1
    assert summary["mfu_pct"]["last"] is None
    assert "data/rows" not in summary
