#!/usr/bin/env bash
# The CPU IsoFLOP sweep of docs/scaling_cpu_sweep.md, end to end: plan, train, collect, fit.
# 3 budgets x 4 sizes of tiny debug_sweep models on procedural data, batches of 2 rows (many
# optimiser steps per FLOP), two runs at a time. Usage: tools/isoflop_cpu_sweep.sh [SWEEP_DIR]
set -euo pipefail
OUT=${1:-runs/isoflop_cpu}
unimm isoflop plan --recipe debug_sweep --budgets 3e10 1e11 3e11 --d-model 16 24 32 48 \
  --aspect 16 --head-dim 8 --kv-group 1 --ffn-multiple 3 --batch-rows 2 --out "$OUT" \
  --training.local_batch_size 2
JOBS=2 OMP_NUM_THREADS=1 bash "$OUT/launch_local.sh"
unimm isoflop collect --plan "$OUT/plan.json" --eval-batches 32
unimm isoflop fit --csv "$OUT/runs.csv" --out "$OUT/fits"
