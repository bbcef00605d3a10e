"""Weights as sharded safetensors plus the index transformers reads, both ways."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unimm.errors import ConfigError

INDEX = "model.safetensors.index.json"
CHECKSUMS = "sha256"
"""Key in the index's ``metadata``: {file: sha256 hex digest} of every weight file to-hf wrote."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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
    weight_map, checksums = {}, {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # "format": "pt" is how transformers tells torch files from other frameworks'.
        save_file({name: state[name].contiguous() for name in names}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        checksums[file] = sha256_of(folder / file)  # of the bytes on disk, as a reader will see them
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total, CHECKSUMS: checksums}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX).read_text())
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError("no weight_map")
    except ValueError as err:
        raise ConfigError(f"{folder / INDEX}: not a safetensors index ({err})") from err
    return index


def _weight_files(folder: Path) -> list[str]:
    if (folder / INDEX).is_file():
        return sorted(set(_index(folder)["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ConfigError(f"{folder}: no {INDEX} and no model.safetensors")


def verify_checksums(folder: Path) -> bool:
    """Check every weight file against the sha256 recorded in the index; False when the folder
    records none (an export from elsewhere or from an older unimm). A mismatch, a missing file
    or a file without a recorded checksum is a ConfigError naming the file."""
    files = _weight_files(folder)
    metadata = _index(folder).get("metadata") if (folder / INDEX).is_file() else None
    recorded = metadata.get(CHECKSUMS) if isinstance(metadata, dict) else None
    if not recorded:
        return False
    if not isinstance(recorded, dict):
        raise ConfigError(f"{folder / INDEX}: metadata.{CHECKSUMS} is not a {{file: sha256}} mapping")
    for file in files:
        path = folder / file
        if file not in recorded:
            raise ConfigError(f"{path}: {INDEX} records no sha256 for it (the index was edited?)")
        if not path.is_file():
            raise ConfigError(f"{path}: missing ({INDEX} lists it)")
        if (actual := sha256_of(path)) != recorded[file]:
            raise ConfigError(
                f"{path}: damaged: its sha256 is {actual}, {INDEX} records {recorded[file]} "
                "(copy the folder again, or export it again with unimm convert to-hf)"
            )
    return True


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a folder with an index, or with one ``model.safetensors``."""
    files = _weight_files(folder)
    state = {}
    for file in files:
        try:
            state |= load_file(folder / file)
        except Exception as err:  # missing or damaged shard
            raise ConfigError(f"{folder / file}: cannot read ({type(err).__name__}: {err})") from err
    return state
