#!/usr/bin/env bash
# One prepared GPU validation run (tools/gpu_check.py): kernel parity and timing, FlexAttention
# with the hybrid mask, 20 training steps of dense_1b5, modality_ffn_2b3 and a shortened moe_e256.
#
#   bash tools/gpu_check.sh OUT_DIR [--dry-run] [--timeout S] [--sections a,b,...]
#
# Writes OUT_DIR/gpu_check.md, OUT_DIR/gpu_check.json (also after every section) and
# OUT_DIR/backend_table.json (the `auto` policy's table, kernels/policy.py). Global
# timeout 480 s (dry run 2400 s) unless --timeout is given. --dry-run runs every code path on
# CPU at tiny shapes.
# On a machine whose Python lacks the project's dependencies (torchtitan, webdataset, torchdata,
# av, ...), wheels in .whl/ (see /work/.library/device/README.md) are installed into /tmp/site.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash tools/gpu_check.sh OUT_DIR [--dry-run] [--timeout S] [--sections a,b]" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$1"; shift
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [ -n "${PYTHON:-}" ]; then :
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
else PYTHON=python3; fi
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the repository itself, importable as `unimm` without an install (kernels/ etc. map via pyproject)
if ! "$PYTHON" -c "import unimm.kernels" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 \
        || echo "gpu_check.sh: warning: unimm is not importable and could not be installed" >&2
fi
export GPU_CHECK_COMMAND="bash tools/gpu_check.sh $OUT $*"
export PYTHONUNBUFFERED=1
# Triton keeps autotuning choices on disk: later sections (own processes) reuse kernel_parity's.
export TRITON_CACHE_AUTOTUNING=1
cd "$ROOT" && exec "$PYTHON" tools/gpu_check.py "$OUT" "$@"
