"""Weights as sharded safetensors plus the index transformers reads, both ways."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unimm.errors import ConfigError

INDEX = "model.safetensors.index.json"


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names, each group at most max_shard_bytes (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards = _shards(state, max_shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # "format": "pt" is how transformers tells torch files from other frameworks'.
        save_file({name: state[name].contiguous() for name in names}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a folder with an index, or with one ``model.safetensors``."""
    if (folder / INDEX).is_file():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{folder}: no {INDEX} and no model.safetensors")
    state = {}
    for file in files:
        try:
            state |= load_file(folder / file)
        except Exception as err:  # missing or damaged shard
            raise ConfigError(f"{folder / file}: cannot read ({type(err).__name__}: {err})") from err
    return state
