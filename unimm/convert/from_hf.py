"""`unimm convert from-hf`: a folder `to-hf --format unimm` wrote, back to a DCP checkpoint.

The weights land in ``RUN/checkpoint/step-0`` as a model-only checkpoint, the layout of
torchtitan's seed checkpoint: `unimm train --out RUN` resumes from it, and any run starts from
it with ``--checkpoint.initial_load_path RUN/checkpoint/step-0 --checkpoint.initial_load_model_only``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unimm.convert.architecture import check_shapes, flavor_differences
from unimm.convert.dcp_io import save_model_checkpoint
from unimm.convert.hf_config import model_config_from_hf
from unimm.convert.safetensors_io import read_safetensors
from unimm.convert.staging import staged_folder
from unimm.convert.state_dict_adapter import UnimmStateDictAdapter
from unimm.errors import ConfigError


def _as_trained(t: torch.Tensor) -> torch.Tensor:
    # torchtitan keeps float32 weights (FSDP applies the mixed precision in the forward).
    return t.float() if t.is_floating_point() else t


def import_from_hf(hf: Path, run: Path, overwrite: bool) -> list[str]:
    """Write ``run/checkpoint/step-0``; return the registered model flavors it matches."""
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
    hf_state = read_safetensors(hf)
    state = {name: _as_trained(t) for name, t in UnimmStateDictAdapter(model, None).from_hf(hf_state).items()}
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    check_shapes(model, shapes, hf, f"its {config_file.name}")
    with staged_folder(run / "checkpoint", overwrite) as folder:
        save_model_checkpoint(state, folder / "step-0")
    return [name for name, differences in flavor_differences(shapes).items() if not differences]
