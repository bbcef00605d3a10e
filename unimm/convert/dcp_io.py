"""Model weights in and out of torchtitan DCP checkpoints, in one process.

A checkpoint folder holds a ``.metadata`` file and one ``.distcp`` file per writing rank;
the metadata describes every tensor whole, so one process reads a checkpoint written by any
number of ranks. torchtitan flattens the model's parameters to the top level of the saved
state; everything else (optimizer, data position, LR schedule, step) sits under its own key.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchtitan.components.checkpoint import DATALOADER, LR_SCHEDULER, OPTIMIZER, TRAIN_STATE

from unimm.errors import ConfigError

TRAINING_STATES = (OPTIMIZER, DATALOADER, LR_SCHEDULER, TRAIN_STATE)


def _cause(err: BaseException) -> str:
    """One line for a failed read. DCP wraps each rank's error in a CheckpointException (a
    BaseException) whose text is a traceback; the wrapped error is what a person can act on."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


@contextmanager
def _single_process():
    # DCP warns that it "assumes" one process even when asked for exactly that (no_dist).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class DcpCheckpoint:
    """The model part of one checkpoint folder (``run/checkpoint/step-N``)."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_dir():
            raise ConfigError(f"{path}: no such checkpoint folder")
        if not (path / ".metadata").is_file():
            raise ConfigError(f"{path}: not a complete DCP checkpoint (no .metadata file)")
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as err:  # a truncated or foreign file: say which folder, not a traceback
            raise ConfigError(f"{path}: cannot read .metadata ({_cause(err)})") from err
        self._tensors = {
            name: meta
            for name, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and name.split(".")[0] not in TRAINING_STATES
        }
        if not self._tensors:
            raise ConfigError(f"{path}: the checkpoint holds no model weights")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(meta.size) for name, meta in self._tensors.items()}

    def load(self) -> dict[str, torch.Tensor]:
        """Every model tensor, whole, in its saved dtype."""
        state = {
            name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            for name, meta in self._tensors.items()
        }
        try:
            with _single_process():
                dcp.load(state, checkpoint_id=str(self.path), no_dist=True)
        except (Exception, CheckpointException) as err:  # a missing or damaged .distcp file
            raise ConfigError(f"{self.path}: cannot read the checkpoint's weights ({_cause(err)})") from err
        return state


def save_model_checkpoint(state: dict[str, torch.Tensor], path: Path) -> None:
    """A model-only checkpoint, as torchtitan's seed checkpoint (step-0) is."""
    with _single_process():
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
