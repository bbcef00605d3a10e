"""Every Triton kernel specialization at every tile config compiles for sm90 without a GPU
(unimm.kernels.sm90_check: Triton's frontend, LLVM and bundled ptxas), with its K loop
software-pipelined, wgmma MMAs, shared memory under the limit, and TMA copies exactly in the
weight-TMA configs. A kernel edit that breaks the Hopper build fails here, not in a GPU session."""

import os
import subprocess
import sys

from unimm.kernels.sm90_check import CASES


def test_every_kernel_config_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "unimm.kernels.sm90_check"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if " shared " in line]
    configs = [config for case in CASES for config in case[5]]
    assert len(lines) == len(configs) == 23, proc.stdout
    assert sum(" tma True" in line for line in lines) == sum(c.WEIGHT_TMA for c in configs) == 9, proc.stdout
    assert proc.stdout.rstrip().endswith("all configs compile for sm90")
