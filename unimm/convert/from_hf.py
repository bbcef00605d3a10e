"""`unimm convert from-hf`: a folder `to-hf --format unimm` wrote, back to a DCP checkpoint.

The weights land in ``RUN/checkpoint/step-0`` as a model-only checkpoint, the layout of
torchtitan's seed checkpoint: `unimm train --out RUN` resumes from it, and any run starts from
it with ``--checkpoint.initial_load_path RUN/checkpoint/step-0 --checkpoint.initial_load_model_only``.

RUN must hold no training state: from-hf refuses a folder with other checkpoints or a run's
metrics, with or without ``--overwrite``, and touches nothing there. Writing step-0 beside a run's
step-N would not even be used (unimm train resumes from the highest step), and replacing the
checkpoint folder would delete the run. ``--overwrite`` replaces only a step-0 that from-hf
wrote, recognised by the marker file it leaves in it.

The weight files are checked against the sha256 checksums to-hf records in the index; a
folder without them (exported elsewhere) is read with a warning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from unimm.convert.architecture import check_shapes, flavor_differences
from unimm.convert.dcp_io import save_model_checkpoint
from unimm.convert.hf_config import model_config_from_hf
from unimm.convert.safetensors_io import INDEX, read_safetensors, verify_checksums
from unimm.convert.staging import seed_checkpoint_destination, staged_folder
from unimm.convert.state_dict_adapter import UnimmStateDictAdapter
from unimm.errors import ConfigError


def _as_trained(t: torch.Tensor) -> torch.Tensor:
    # torchtitan keeps float32 weights (FSDP applies the mixed precision in the forward).
    return t.float() if t.is_floating_point() else t


MARKER = "unimm_from_hf.json"
"""Written into the step-0 folder from-hf makes: the only checkpoint --overwrite may replace."""


def import_from_hf(hf: Path, run: Path, overwrite: bool) -> list[str]:
    """Write ``run/checkpoint/step-0``; return the registered model flavors it matches."""
    step0 = seed_checkpoint_destination(
        run, overwrite, "from-hf", MARKER,
        "Pass a new --out, or start a run from the export with --checkpoint.initial_load_path "
        f"{hf.resolve()} --checkpoint.initial_load_in_hf --checkpoint.initial_load_model_only",
    )
    config_file = hf / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{hf}: no config.json; from-hf reads folders `unimm convert to-hf` wrote")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "unimm":
        raise ConfigError(
            f"{config_file}: model_type {config.get('model_type')!r}; from-hf reads the folders "
            "`unimm convert to-hf --format unimm` writes"
        )
    model = model_config_from_hf(config, config_file)
    verified = verify_checksums(hf)
    if not verified:
        print(
            f"unimm: warning: {hf}: no sha256 checksums in its {INDEX} (a folder not written by unimm "
            "convert to-hf, or by an older one): its weight files are read unverified",
            file=sys.stderr,
        )
    hf_state = read_safetensors(hf)
    state = {name: _as_trained(t) for name, t in UnimmStateDictAdapter(model, None).from_hf(hf_state).items()}
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    check_shapes(model, shapes, hf, f"its {config_file.name}")
    with staged_folder(step0, overwrite) as folder:
        save_model_checkpoint(state, folder)
        marker = {"written_by": "unimm convert from-hf", "source": str(hf.resolve()), "sha256_verified": verified}
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return [name for name, differences in flavor_differences(shapes).items() if not differences]
