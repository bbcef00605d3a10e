"""``unimm train``: check the recipe and its data in this process, then run torchrun.

Checks that need no model weights run here first so that a wrong recipe name, a sequence
the model cannot hold, shards of the wrong latent width or documents longer than a row fail
with one clear line, not a stack trace from every rank; and a run folder whose checkpoints
already reach --training.steps is reported as finished instead of being launched to train
nothing.

Before torchrun starts, every option and config value that can be checked without data is
(unimm.titan.config_checks); a folder that holds a checkpoint is compared with the settings
it was started with (DIR/run.json, unimm.titan.run_record); and the folder is locked for the
whole run (DIR/.unimm.lock, unimm.titan.run_lock), so a second launch on it is refused. The
agent and the workers die with this process (unimm.titan.lifeline).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from unimm.errors import ConfigError
from unimm.titan.config_checks import check_arguments, check_config, check_devices, lr_overrides
from unimm.titan.lifeline import PARENT_ENV
from unimm.titan.run_lock import RunLock, launcher_env
from unimm.titan.run_record import check_model, check_resume, model_settings, read_record, run_settings, write_record

RECIPE_MODULE = "unimm.recipes"


def recipe_names() -> list[str]:
    from unimm.recipes import config_registry

    return sorted(
        name
        for name, fn in vars(config_registry).items()
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == config_registry.__name__
    )


def recipe_summaries() -> dict[str, str]:
    """Recipe name -> its docstring's first paragraph, on one line (``unimm train --help``)."""
    from unimm.recipes import config_registry

    summaries = {}
    for name in recipe_names():
        doc = (getattr(config_registry, name).__doc__ or "").strip()
        text = " ".join(doc.split("\n\n")[0].replace("``", "").split())
        summaries[name] = text if len(text) <= 100 else text[:97] + "..."
    return summaries


@dataclass(frozen=True)
class JobShape:
    """The GPUs of a job: the world size and how many of them share a node."""

    world_size: int
    gpus_per_node: int

    @property
    def nodes(self) -> int:
        return self.world_size // self.gpus_per_node


_planned_job: JobShape | None = None
"""The job a recipe is being loaded for outside torchrun (``as_job``)."""


@contextmanager
def as_job(shape: JobShape):
    """Load recipes as the ranks of ``shape`` will (the launcher and ``unimm plan-memory``,
    which run before, or without, torchrun)."""
    global _planned_job
    saved, _planned_job = _planned_job, shape
    try:
        yield shape
    finally:
        _planned_job = saved


def job_shape() -> JobShape:
    """The job a recipe is loaded for: the one set by ``as_job``, else torchrun's (every rank
    gets ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``, the processes of its node), else one process."""
    if _planned_job is not None:
        return _planned_job
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if local < 1 or world % local:
        raise ConfigError(
            f"torchrun's WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local} (processes per node): "
            "the recipes' parallel layouts need the same number of GPUs on every node"
        )
    return JobShape(world_size=world, gpus_per_node=local)


def hsdp_degrees(shape: JobShape) -> tuple[int, int]:
    """(replicate, shard) of HSDP: parameters sharded over the GPUs of a node (NVLink), each
    node a full replica, gradients all-reduced across nodes."""
    return shape.nodes, shape.gpus_per_node


def expert_parallel_degree(shape: JobShape, num_experts: int) -> int:
    """Expert-parallel degree for plain FSDP over all GPUs: the largest divisor of the GPUs of
    a node that divides the experts (the token all-to-all stays inside a node; at 8 GPUs a node
    1008 experts go 126 to a GPU). The experts' other sharding axis (torchtitan's ``efsdp``)
    is world_size / ep."""
    return math.gcd(num_experts, shape.gpus_per_node)


def load_recipe(name: str, overrides: list[str] | None = None, job: JobShape | None = None):
    """The recipe's Trainer.Config with command-line overrides applied (torchtitan syntax);
    ``job``: the job it is loaded for when not under torchrun (see ``job_shape``)."""
    from torchtitan.config import ConfigManager

    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    args = ["--module", RECIPE_MODULE, "--config", name, *(overrides or [])]
    if job is None:
        return ConfigManager().parse_args(args)
    with as_job(job):
        return ConfigManager().parse_args(args)


def preflight(config):
    """Check the recipe against its data without building the model; returns the manifest."""
    if hasattr(config, "data_fit"):
        config.data_fit()  # a recipe fitted to its data: explicit values the data contradicts
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    config.dataloader.bind_model(model_config)
    return config.dataloader.prepare(config.training.seq_len, config.tokenizer.build())


def latest_checkpoint_step(config) -> int | None:
    """The step torchtitan would resume from in the run folder, None when it starts afresh:
    the highest complete ``step-N`` (DCP ``.metadata`` or an HF index, as torchtitan checks),
    or ``--checkpoint.load_step`` when given."""
    checkpoint = config.checkpoint
    folder = Path(config.dump_folder) / checkpoint.folder
    if not checkpoint.enable or not folder.is_dir():
        return None
    steps = [
        int(match.group(1))
        for path in folder.iterdir()
        if (match := re.fullmatch(r"step-(\d+)", path.name))
        and ((path / ".metadata").is_file() or (path / "model.safetensors.index.json").is_file())
    ]
    if not steps:
        return None
    return checkpoint.load_step if checkpoint.load_step >= 0 else max(steps)


def finished_message(config) -> str | None:
    """A message when the run folder's checkpoint already reaches --training.steps."""
    step, total = latest_checkpoint_step(config), config.training.steps
    if step is None or step < total:
        return None
    where = "reaches" if step == total else "is past"
    return (
        f"unimm: {config.dump_folder} is finished: its checkpoint step-{step} {where} --training.steps={total}, "
        f"so there is nothing to train. To continue this run, pass a larger --steps (e.g. --steps {2 * total}; "
        "the LR schedule is then laid out over the new total); to start another, pass a new --out."
    )


def torchrun_command(recipe: str, overrides: list[str], nproc: int) -> list[str]:
    # torchrun's agent runs through unimm.titan.lifeline so that it dies with this process;
    # each worker ties itself to the agent (unimm.titan.train): no worker outlives the launch.
    return [
        sys.executable, "-m", "unimm.titan.lifeline", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}",
        "-m", "unimm.titan.train", "--module", RECIPE_MODULE, "--config", recipe, *overrides,
    ]


def _warn(message: str) -> None:
    print(f"unimm: warning: {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT or SIGTERM reached ``unimm train`` while torchrun ran; torchrun has been stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_GRACE_S = 60
"""How long torchrun may take to stop its workers after SIGTERM before it is killed."""


def run_torchrun(command: list[str], env: dict[str, str]) -> int:
    """Run torchrun and wait for it. SIGINT or SIGTERM to this process is passed on as SIGTERM
    (torchrun then stops its workers: SIGTERM, later SIGKILL) and raises Interrupted once
    torchrun has exited; if it does not exit within STOP_GRACE_S it is killed, and its workers
    die with it (unimm.titan.lifeline)."""
    proc = subprocess.Popen(command, env=env)
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        raise Interrupted(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, on_signal)
    try:
        try:
            return proc.wait()
        except (Interrupted, KeyboardInterrupt):
            # Ctrl-C in a terminal also reached torchrun (same process group); give it a
            # moment to act on it before it is asked again. A second signal kills it.
            def kill_now(signum, frame):
                received.append(signum)
                proc.kill()

            for signum in handlers:
                signal.signal(signum, kill_now)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise Interrupted(received[0] if received else signal.SIGINT) from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def train(
    recipe: str,
    out: str,
    steps: int | None,
    nproc: int,
    extra: list[str],
    lr: float | None = None,
    allow_config_change: bool = False,
) -> int:
    """``unimm train``: check the options, the config and the run folder, then run torchrun
    while holding the folder's lock (unimm.titan.run_lock); returns torchrun's exit status."""
    for warning in check_arguments(out, steps, nproc, lr, extra):
        _warn(warning)
    overrides = list(extra) + ["--dump_folder", str(out)]
    if steps is not None:
        overrides += ["--training.steps", str(steps)]
    job = JobShape(world_size=nproc, gpus_per_node=nproc)  # torchrun --standalone: one node
    config = load_recipe(recipe, overrides + ([] if lr is None else lr_overrides(lr)), job)
    if lr is not None:  # --lr is the peak LR of every param group
        overrides += lr_overrides(lr, max(1, len(config.optimizer.param_groups)))
        if len(config.optimizer.param_groups) > 1:
            config = load_recipe(recipe, overrides, job)
    for warning in check_config(config, nproc) + check_devices(nproc):
        _warn(warning)

    lock = RunLock(out, role="unimm train")
    if Path(out).is_dir():
        lock.acquire()  # refuse a second writer before the (slow) data checks
    try:
        return _train_locked(recipe, out, nproc, config, overrides, lock, allow_config_change)
    finally:
        lock.release()


def _train_locked(recipe, out, nproc, config, overrides, lock: RunLock, allow_config_change: bool) -> int:
    record = read_record(out)
    resuming = latest_checkpoint_step(config) is not None
    settings = run_settings(config, recipe, nproc)
    if resuming:
        for warning in check_resume(out, record, settings, allow_change=allow_config_change):
            _warn(warning)
    # Finished runs exit 0: the folder already holds what was asked for (a run trained to
    # --training.steps), so re-running a launch script or a requeued job is a no-op, not a
    # failure (the IsoFLOP launch scripts skip finished runs the same way).
    finished = finished_message(config)
    if finished:
        print(finished)
        return 0
    manifest = preflight(config)
    if hasattr(config, "data_fit"):
        print(f"unimm: {recipe}: model fitted to the data: {config.data_fit().describe()}")
    if not config.dataloader.source_weights:
        weights = config.dataloader.weights(manifest)
        shown = ", ".join(f"{name} {w / sum(weights.values()):.4g}" for name, w in weights.items())
        print(f"unimm: source weights from {manifest.path}: {shown}")
    settings.update(model_settings(config))
    if resuming:
        check_model(out, record, settings)

    lock.acquire()  # creates the folder on a first launch
    write_record(out, record, settings)
    env = dict(os.environ)
    # torchrun defaults every rank to 1 thread; on a CPU box share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(launcher_env(lock))  # rank 0 finds the folder locked on its behalf
    env[PARENT_ENV] = str(os.getpid())  # torchrun's agent dies with this process
    sys.stdout.flush()
    rc = run_torchrun(torchrun_command(recipe, overrides, nproc), env)
    if rc == 0:
        from unimm.plots import plot_losses

        png = plot_losses(Path(out) / "metrics.jsonl", Path(out) / "loss.png")
        if png:
            print(f"unimm: metrics in {Path(out) / 'metrics.jsonl'}, loss curves in {png}")
    return rc
