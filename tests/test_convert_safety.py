"""`unimm convert` never destroys training state, never exports or imports damaged weights
silently, and cleans up after a killed conversion. One small exported model serves the file."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Start, make_start
from unimm.cli import main
from unimm.convert.dcp_io import DcpCheckpoint, save_model_checkpoint
from unimm.convert.from_hf import MARKER
from unimm.convert.safetensors_io import INDEX, read_safetensors
from unimm.convert.staging import staging_prefix


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Start:
    return make_start(tmp_path_factory.mktemp("safety"), "debug")


# -- 1. from-hf never deletes or shadows a training run ----------------------------------------


def training_run(root: Path, start: Start, kind: str) -> Path:
    """A run folder as unimm train leaves it (checkpoints are copies of a real DCP one)."""
    run = root / "run"
    (run / "checkpoint").mkdir(parents=True)
    if kind in ("checkpoints", "both"):
        for step in (10, 20):
            shutil.copytree(start.dcp, run / "checkpoint" / f"step-{step}")
    if kind in ("metrics", "both"):
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    if kind == "seed":  # torchtitan's seed checkpoint: a step-0 that from-hf did not write
        shutil.copytree(start.dcp, run / "checkpoint" / "step-0")
    return run


@pytest.mark.parametrize("kind", ["checkpoints", "metrics", "both", "seed"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_from_hf_refuses_a_training_run_and_touches_nothing(start, tmp_path, capsys, kind, overwrite):
    run = training_run(tmp_path, start, kind)
    before = snapshot(run)
    assert convert("from-hf", "--hf", start.hf, "--out", run, *(["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unimm: error: {run} holds training state") and err.count("\n") == 1
    assert "never replaces a run's checkpoints" in err
    assert snapshot(run) == before  # every checkpoint byte-identical, nothing added


def test_from_hf_overwrite_replaces_only_its_own_output(start, tmp_path, capsys):
    run = tmp_path / "run"
    assert convert("from-hf", "--hf", start.hf, "--out", run) == 0
    step0 = run / "checkpoint" / "step-0"
    assert json.loads((step0 / MARKER).read_text())["sha256_verified"] is True
    capsys.readouterr()
    assert convert("from-hf", "--hf", start.hf, "--out", run) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert convert("from-hf", "--hf", start.hf, "--out", run, "--overwrite") == 0
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["step-0"]  # no staging left
    loaded = DcpCheckpoint(step0).load()
    assert all(torch.equal(loaded[name], start.weights[name]) for name in start.weights)

    # once a run trained from it, the folder is a run's: --overwrite is refused
    shutil.copytree(start.dcp, run / "checkpoint" / "step-5")
    before = snapshot(run)
    assert convert("from-hf", "--hf", start.hf, "--out", run, "--overwrite") == 2
    assert snapshot(run) == before


def test_to_hf_overwrite_refuses_a_run_folder(start, tmp_path, capsys):
    run = training_run(tmp_path, start, "both")
    before = snapshot(run)
    assert convert("to-hf", "--ckpt", start.dcp, "--out", run, "--overwrite") == 2
    assert "holds training state" in capsys.readouterr().err
    assert snapshot(run) == before


# -- 2. to-hf refuses NaN/Inf weights unless asked ----------------------------------------------


def test_to_hf_refuses_nonfinite_weights(start, tmp_path, capsys):
    weights = DcpCheckpoint(start.dcp).load()
    weights["layers.0.attention.wq.weight"].view(-1)[:3] = float("nan")
    weights["lm_head.weight"].view(-1)[7] = float("inf")
    save_model_checkpoint(weights, tmp_path / "poisoned")

    out = tmp_path / "new" / "hf"
    assert convert("to-hf", "--ckpt", tmp_path / "poisoned", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unimm: error: {tmp_path / 'poisoned'}: 2 tensor(s) hold non-finite values")
    assert "layers.0.attention.wq.weight (3 of " in err and ": 3 NaN, 0 Inf)" in err
    assert "lm_head.weight (1 of " in err and "--allow-nonfinite" in err
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unimm-convert")]

    assert convert("to-hf", "--ckpt", tmp_path / "poisoned", "--out", out, "--allow-nonfinite") == 0
    assert "unimm: warning:" in capsys.readouterr().err
    exported = read_safetensors(out)
    assert int(exported["model.layers.0.self_attn.q_proj.weight"].isnan().sum()) == 3
    assert int(exported["lm_head.weight"].isinf().sum()) == 1


# -- 3. checksums: written by to-hf, checked by from-hf ------------------------------------------


def test_export_records_sha256_of_every_weight_file(start):
    index = json.loads((start.hf / INDEX).read_text())
    files = set(index["weight_map"].values())
    recorded = index["metadata"]["sha256"]
    assert set(recorded) == files
    for file in files:
        assert recorded[file] == hashlib.sha256((start.hf / file).read_bytes()).hexdigest()


def test_from_hf_refuses_a_flipped_byte(start, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(start.hf, hf)
    shard = sorted(hf.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # in a tensor's bytes: safetensors itself reads the file without complaint
    shard.write_bytes(bytes(data))
    read_safetensors(hf)

    assert convert("from-hf", "--hf", hf, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unimm: error: {shard}: damaged") and "sha256" in err
    assert not (tmp_path / "run").exists()


def test_from_hf_accepts_an_export_without_checksums_with_a_warning(start, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(start.hf, hf)
    index = json.loads((hf / INDEX).read_text())
    del index["metadata"]["sha256"]
    (hf / INDEX).write_text(json.dumps(index))

    assert convert("from-hf", "--hf", hf, "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert f"unimm: warning: {hf}: no sha256 checksums" in err
    marker = tmp_path / "run" / "checkpoint" / "step-0" / MARKER
    assert json.loads(marker.read_text())["sha256_verified"] is False


# -- 4. a killed conversion's staging folder is cleaned by the next run ----------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):  # not reused since
        os.kill(child.pid, 0)
    return child.pid


def leave_staging(final: Path, pid: int) -> Path:
    folder = final.parent / (staging_prefix(final, pid) + "abcd1234")
    folder.mkdir(parents=True)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    return folder


def test_to_hf_removes_stale_staging_and_keeps_live(start, tmp_path, capsys):
    out = tmp_path / "hf"
    dead = leave_staging(out, dead_pid())
    live = leave_staging(out, os.getpid())  # a conversion still running
    other = leave_staging(tmp_path / "another_hf", dead_pid())  # another target's
    assert convert("to-hf", "--ckpt", start.dcp, "--out", out) == 0
    assert not dead.exists()
    assert live.exists() and other.exists()
    assert f"removed {dead}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", live.name, other.name])


def test_from_hf_removes_stale_staging_in_the_checkpoint_folder(start, tmp_path):
    step0 = tmp_path / "run" / "checkpoint" / "step-0"
    dead = leave_staging(step0, dead_pid())
    live = leave_staging(step0, os.getpid())
    # a staging folder is not training state: from-hf goes ahead
    assert convert("from-hf", "--hf", start.hf, "--out", tmp_path / "run") == 0
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in step0.parent.iterdir()) == sorted(["step-0", live.name])
