"""The newer method options together resume exactly and convert to Hugging Face format and back.

One run carries the dual encoder, x-prediction, loss centering (its running center is train
state) and a staged optimizer (per-group learning rates split torchtitan's param groups): a run
stopped halfway and run again on its folder must continue the uninterrupted curve.
"""

import pytest
import torch

from conftest import losses, train_recipe
from unimm.cli import main

pytestmark = pytest.mark.slow

VARIANT = (
    "--loss.flow.prediction", "x",
    "--loss.loss_centering",
    "--stage.lr_multipliers", "heads", "2",
    "--lr_scheduler.total_steps", "6",
)


def test_dual_encoder_x_pred_centered_staged_run_resumes_exactly_and_converts(tmp_path, data_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_recipe("stack_cpu_dual_encoder", straight, data_cache, *VARIANT, steps=6)
    train_recipe("stack_cpu_dual_encoder", resumed, data_cache, *VARIANT, steps=3)
    train_recipe("stack_cpu_dual_encoder", resumed, data_cache, *VARIANT, steps=6)
    for key in ("loss", "loss_lm", "loss_flow", "loss/center_c", "loss/weight_flow"):
        a, b = losses(straight, key), losses(resumed, key)
        assert sorted(a) == sorted(b) == list(range(1, 7)), key
        for step in range(4, 7):
            assert b[step] == pytest.approx(a[step], rel=1e-5), (key, step)

    ckpt = resumed / "checkpoint" / "step-6"
    hf, back = tmp_path / "hf", tmp_path / "back"
    recipe = ["--recipe", "stack_cpu_dual_encoder"]
    assert main(["convert", "to-hf", "--ckpt", str(ckpt), "--out", str(hf), *recipe]) == 0
    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(back)]) == 0
    from unimm.convert.dcp_io import DcpCheckpoint

    original, returned = DcpCheckpoint(ckpt).load(), DcpCheckpoint(back / "checkpoint" / "step-0").load()
    assert returned.keys() == original.keys() and "understanding_proj.weight" in returned
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
