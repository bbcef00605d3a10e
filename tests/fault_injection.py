"""Test-only training entry point: ``python -m fault_injection ARGS`` is ``python -m
unimm.titan.train ARGS`` with faults injected, chosen by the JSON in ``UNIMM_FAULTS``:

- ``poison_steps`` [int]: the batch latents of these steps become NaN (so the loss and the
  gradients do), on the ranks in ``poison_ranks`` (default: all).
- ``kill_in_step`` int: SIGKILL this process in that step, after its backward, before the
  optimizer step.
- ``kill_in_checkpoint`` int: SIGKILL this process while it writes checkpoint step-N, after
  the data files were written (the last one cut to half its size), before ``.metadata``.
- ``nan_weight_after_step`` int: after that step, set one weight to NaN (so the next
  checkpoint must refuse to write).

Nothing here is imported by the package; tests run it with ``tests/`` on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal

import torch


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(faults: dict) -> None:
    from torch.distributed.checkpoint import filesystem

    from unimm.titan.trainer import UnimmTrainer

    poison = set(faults.get("poison_steps", []))
    poison_ranks = faults.get("poison_ranks")
    kill_in_step = faults.get("kill_in_step")
    kill_in_checkpoint = faults.get("kill_in_checkpoint")
    nan_weight_after = faults.get("nan_weight_after_step")

    forward_backward = UnimmTrainer.forward_backward_step

    def faulty_forward_backward(self, *args, **kwargs):
        rank = torch.distributed.get_rank()
        if self.step in poison and (poison_ranks is None or rank in poison_ranks):
            inputs = kwargs["input_dict"]
            kwargs["input_dict"] = {**inputs, "latents": inputs["latents"] * float("nan")}
        out = forward_backward(self, *args, **kwargs)
        if self.step == kill_in_step:
            _kill()
        return out

    UnimmTrainer.forward_backward_step = faulty_forward_backward

    train_step = UnimmTrainer.train_step

    def faulty_train_step(self, data_iterator):
        train_step(self, data_iterator)
        if self.step == nan_weight_after:
            with torch.no_grad():
                param = next(self.model_parts[0].parameters())
                local = param._local_tensor if hasattr(param, "_local_tensor") else param
                local.view(-1)[0] = float("nan")

    UnimmTrainer.train_step = faulty_train_step

    finish = filesystem.FileSystemWriter.finish

    def faulty_finish(self, metadata, results):
        if kill_in_checkpoint is not None and str(self.path).rstrip("/").endswith(f"step-{kill_in_checkpoint}"):
            data = sorted(p for p in os.listdir(self.path) if p.endswith(".distcp"))
            if data:
                path = os.path.join(self.path, data[-1])
                os.truncate(path, os.path.getsize(path) // 2)
            _kill()
        return finish(self, metadata, results)

    filesystem.FileSystemWriter.finish = faulty_finish


if __name__ == "__main__":
    install(json.loads(os.environ.get("UNIMM_FAULTS", "{}")))
    from unimm.titan.train import main

    main()
