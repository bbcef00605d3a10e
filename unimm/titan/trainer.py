"""The torchtitan Trainer for the two-headed objective: next-token CE + flow matching.

torchtitan's Trainer owns distributed init, FSDP, checkpoints (DCP), the LR schedule and
metrics; this subclass replaces only what differs from language modelling: the batch has
visual latents that are noised per frame, the attention mask comes from document/frame ids,
and the loss has two normalised parts that are logged separately.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import utils as tools_utils
from torchtitan.trainer import Trainer

from unimm.data import wire
from unimm.data.batch import IGNORE_INDEX, PROVENANCE_KEY, UNDERSTANDING_KEYS, padding_mask
from unimm.data.loader import MultimodalDataLoader
from unimm.flops import model_flops
from unimm.flow import frame_noise, interpolate
from unimm.losses import TransfusionLoss
from unimm.masks import build_attention_mask
from unimm.model.moe import moe_layers, update_expert_biases
from unimm.model.params import meta_model
from unimm.model.transformer import rows_at
from unimm.titan import compat, step_metrics
from unimm.titan.checkpoint import UnimmCheckpointManager
from unimm.titan.metrics_jsonl import ExpertLoadLog, JsonlLogger, drop_rows_after
from unimm.titan.nonfinite import NonFiniteGuard, SkippedStep, samples_of
from unimm.titan.stage import StageConfig, StagedOptimizersContainer, prepare_stage_start
from unimm.tokenizer import Tokenizer


class UnimmTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        tokenizer: Tokenizer.Config = field(default_factory=Tokenizer.Config)
        dataloader: MultimodalDataLoader.Config = field(default_factory=MultimodalDataLoader.Config)
        loss: TransfusionLoss.Config = field(default_factory=TransfusionLoss.Config)
        metrics_file: str = "metrics.jsonl"
        """Per-step metrics as JSON lines, relative to dump_folder."""
        max_consecutive_nonfinite_steps: int = 5
        """A step whose loss or gradient norm is NaN/Inf is skipped (no update) and counted
        (train/skipped_nonfinite_steps); this many in a row stop the run (unimm.titan.nonfinite)."""
        stage: StageConfig = field(default_factory=StageConfig)
        """Staged training (unimm.titan.stage): --stage.freeze GROUPS, --stage.lr_multipliers
        GROUP X ..., --stage.init_from RUN (groups: unimm.titan.param_groups)."""

    def __init__(self, config: Config):
        compat.apply()
        model_config = config.model_spec.model
        config.dataloader.bind_model(model_config)  # the loader checks its shards against both
        # batches bound for this device: wire format, and on CUDA built ahead in a worker (loader.py)
        config.dataloader.device_type = tools_utils.device_type
        # torchtitan's checkpoint manager plus finiteness checks on save and fallback on load
        config.checkpoint = UnimmCheckpointManager.adopt(config.checkpoint)
        # staged training: frozen groups and per-group LRs in the optimizer, the checkpoint a
        # stage starts from resolved and checked against the model (unimm.titan.stage)
        config.optimizer = StagedOptimizersContainer.adopt(config.optimizer, config.stage)
        prepare_stage_start(config)
        super().__init__(config)
        self._batches_ahead = None  # the next step's microbatches, read while the device works (_read_ahead)
        rank0 = dist.get_rank() == 0
        self._run_logs = [Path(config.dump_folder) / name for name in (config.metrics_file, "expert_load.jsonl", "nonfinite_steps.jsonl")]
        self.nonfinite = NonFiniteGuard(
            config.max_consecutive_nonfinite_steps, self._run_logs[2] if rank0 else None
        )
        self.mask_backend = model_config.mask_backend(self.device)
        # perf/* metrics (unimm.titan.step_metrics): exact FLOPs per position of each part,
        # counted once on a meta-device copy; the device's peak (None on CPU: no MFU)
        self._model_flops = model_flops(meta_model(model_config))
        self._peak_flops = step_metrics.peak_flops(self.device)
        self._mask_build_s = 0.0  # host time in build_attention_mask since the last log
        self._mask_spans = step_metrics.DeviceSpans(self.device)  # its device time (CUDA)
        self.flow_shift = config.loss.flow.shift_factor(self.dataloader.manifest.tokens_per_frame, model_config.latent_dim)
        ffn = model_config.ffn
        self.moe_config = ffn.moe if ffn.kind == "moe" else None
        self.moe_layers = moe_layers(self.model_parts[0])
        self.router_loss_weight = (
            self.moe_config.aux_loss_coef if self.moe_config and self.moe_config.load_balance == "aux_loss" else 0.0
        )
        if self.loss_fn.centering is not None and hasattr(self.checkpointer, "states"):
            # the running loss center is training state: a resume continues with its weights
            self.checkpointer.states["loss_centering"] = self.loss_fn
        self.expert_load_log = None
        if dist.get_rank() == 0:
            if self.moe_layers:
                self.expert_load_log = ExpertLoadLog(Path(config.dump_folder) / "expert_load.jsonl")
            self.metrics_processor.logger = JsonlLogger(
                Path(config.dump_folder) / config.metrics_file,
                world_size=dist.get_world_size(),
                passthrough=self.metrics_processor.logger,
            )

    # -- mixture-of-experts bookkeeping ---------------------------------------------------

    def _collect_expert_loads(self) -> torch.Tensor | None:
        """Tokens each expert got this step, summed over data-parallel ranks [layers, E];
        resets the layers' counters."""
        if not self.moe_layers:
            return None
        loads = torch.stack([layer.tokens_per_expert for layer in self.moe_layers])
        for layer in self.moe_layers:
            layer.tokens_per_expert.zero_()
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(loads, group=self.parallel_dims.get_mesh("batch").get_group())
        return loads

    def _moe_metrics(self, expert_loads: torch.Tensor | None, balance: float) -> dict[str, float]:
        if expert_loads is None:
            return {}
        metrics = {"moe/balance_loss": balance}
        share = expert_loads / expert_loads.sum(-1, keepdim=True)
        for i, layer_share in enumerate(share):
            # max share over the mean share: 1.0 is perfect balance, E is total collapse
            metrics[f"moe/layer{i}/max_load"] = float(layer_share.max() * len(layer_share))
        if self.expert_load_log is not None:
            self.expert_load_log.write(self.step, expert_loads)
        return metrics

    # -- one optimiser step -------------------------------------------------------------

    def _row_seeds(self, micro_index: int, batch_size: int) -> list[int]:
        if self.parallel_dims.dp_enabled:
            mesh = self.parallel_dims.get_mesh("batch")
            dp_degree, dp_rank = mesh.size(), mesh.get_local_rank()
        else:
            dp_degree, dp_rank = 1, 0
        first_row = (micro_index * dp_degree + dp_rank) * batch_size
        base = (self.config.debug.seed or 0) * 1_000_003 + self.step * 65_537
        return [(base + first_row + i) % (2**63) for i in range(batch_size)]

    def _global_counts(self, microbatches) -> torch.Tensor:
        """Text targets, noised latent elements and real (non-padding) positions in the whole
        global batch: the losses are sums divided by these, so gradients summed over ranks are
        global means. Summed on the host from the loader's counts (unimm.data.wire)."""
        counts = sum(inputs["counts"] for inputs, _ in microbatches).double()
        counts[1] *= self.model_config.latent_dim
        counts = self._to_device(counts)
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(counts, group=self.parallel_dims.get_mesh("batch").get_group())
        return counts.clamp_min(1.0)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for it (pinned on CUDA first: a copy
        from pageable memory would wait for the stream)."""
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def forward_backward_step(self, *, input_dict, labels, counts, micro_index: int) -> torch.Tensor:
        """Forward and backward of one microbatch (in the loader's wire format); returns [loss,
        loss_lm, loss_flow, router balance] (detached, this rank's share of the global means).

        No host sync: the loader's index tensors (unimm.data.wire) replace boolean indexing, the
        heads and losses run over their fixed capacities, and the copies are non-blocking.
        (Loss centering is the exception: its weights are host numbers, _centering_weights.)"""
        batch = wire.to_device(input_dict, self.device)
        self.ntokens_seen += labels.numel()
        mask_start = time.perf_counter()  # host-side time: on CUDA the kernels run async
        with self._mask_spans.span():
            mask = build_attention_mask(batch["document_ids"], batch["frame_ids"], self.mask_backend)
        self._mask_build_s += time.perf_counter() - mask_start
        latents, denoise = batch["latents"], batch["denoise"]
        t_BL, eps = frame_noise(
            latents, batch["frame_ids"], denoise, self.flow_shift,
            self._row_seeds(micro_index, labels.shape[0]),
        )
        z_in = torch.where(denoise[..., None], interpolate(latents, eps, t_BL[..., None]), latents)
        real = ~padding_mask(batch["tokens"], batch["modality"], self.tokenizer.pad_id)
        flow_index = batch["flow_index"]
        with self.train_context():
            lm_sum, flow_pred, balance = self.model_parts[0](
                batch["tokens"], z_in, t_BL, batch["modality"], batch["positions"], mask,
                batch["lm_index"], flow_index, real,
                **{k: batch[k] for k in UNDERSTANDING_KEYS if k in batch},  # dual encoder (batch.py)
                lm_loss=self.loss_fn.lm_loss(batch["lm_labels"]),
            )
            # the router term is a mean over real tokens: weight it by this microbatch's share
            balance = balance.mean() * (real.sum() / counts[2])
            loss_lm, loss_flow = self.loss_fn.step_parts(
                lm_sum, flow_pred, rows_at(latents, flow_index), rows_at(eps, flow_index),
                rows_at(t_BL[..., None], flow_index), batch["flow_valid"], counts,
            )
            weights = None
            if self.loss_fn.centering is not None:
                targets, denoised = batch["lm_labels"] != IGNORE_INDEX, batch["flow_valid"]
                weights = self._centering_weights(loss_lm, loss_flow, targets, denoised, counts, micro_index)
            loss = self.loss_fn.combine(loss_lm, loss_flow, self.router_loss_weight * balance, weights)
            loss.backward()
        return torch.stack([loss.detach(), loss_lm.detach(), loss_flow.detach(), balance.detach()])

    def _centering_weights(self, loss_lm, loss_flow, lm_positions, denoise, counts, micro_index: int):
        """Loss-centering weights (w_LM, w_flow) of one microbatch (paper App. D.2), from its
        mean losses over all data-parallel ranks; the step's last microbatch advances the
        center with the step's mean losses (the sums of the microbatches' shares).
        ``lm_positions``, ``denoise``: True at the microbatch's LM targets and denoised
        positions (any layout: only their counts are read)."""
        latent_dim = self.model_config.latent_dim
        stats = torch.stack([
            loss_lm.detach().double(), loss_flow.detach().double(),
            lm_positions.sum().double(), denoise.sum().double() * latent_dim,
        ])
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(stats, group=self.parallel_dims.get_mesh("batch").get_group())
        share_lm, share_flow, n_lm, n_flow = stats.tolist()
        if micro_index == 0:
            self._centering_step = [0.0, 0.0]
        self._centering_step = [self._centering_step[0] + share_lm, self._centering_step[1] + share_flow]
        # a share is the microbatch's sum over the global count: its own mean is share * N / n
        mean_lm = share_lm * float(counts[0]) / n_lm if n_lm else 0.0
        mean_flow = share_flow * float(counts[1]) / n_flow if n_flow else 0.0
        weights = self.loss_fn.centering.weights(mean_lm, mean_flow)
        if micro_index == self.gradient_accumulation_steps - 1:
            self.loss_fn.centering.update(*self._centering_step)
        return weights

    # -- train state, resume, read-ahead ------------------------------------------------------

    def state_dict(self):
        return {**super().state_dict(), "skipped_nonfinite_steps": self.nonfinite.skipped}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.nonfinite.skipped = int(state_dict.get("skipped_nonfinite_steps", 0))
        if dist.get_rank() == 0:
            # the steps after the checkpoint run again: drop what a stopped run logged for them
            for path in self._run_logs:
                drop_rows_after(path, self.step)

    def _take_microbatches(self, data_iterator):
        ahead, self._batches_ahead = self._batches_ahead, None
        if isinstance(ahead, BaseException):
            raise ahead
        if ahead is not None:
            return ahead
        return [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]

    def _read_ahead(self, data_iterator) -> None:
        """Take the next step's microbatches now, while the device still runs this step's
        backward, so the wait for the finiteness check does not also wait for the loader
        (with dataloader.num_workers 0 it packs batches in this process; before the check
        existed that work overlapped the backward). Never before a step whose data position
        is saved (a checkpoint step) or reported (a logging step: data counters, tokens/s),
        so checkpoints and metrics are as without it; an exception is raised when the batch
        would have been taken."""
        step, last = self.step, self.config.training.steps
        will_save = getattr(self.checkpointer, "will_save", None)
        if step >= last or will_save is None or will_save(step, last_step=step == last):
            return
        try:
            self._batches_ahead = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
        except Exception as err:  # noqa: BLE001 (re-raised where the batch is used)
            self._batches_ahead = err

    def _skip_step(self, values: list[float], provenance, loss_state) -> None:
        """A non-finite step: no update of any kind; counted; may stop the run (NonFiniteGuard)."""
        self.optimizers.zero_grad()
        if loss_state is not None:
            self.loss_fn.load_state_dict(loss_state)  # loss centering advanced on this step's losses
        samples = samples_of(provenance)
        batch = [list(pair) for pair in samples] if samples is not None else "samples not recorded by the loader"
        batches = [batch]
        if dist.get_world_size() > 1:  # every rank skips this step, so every rank is here
            batches = [None] * dist.get_world_size()
            dist.all_gather_object(batches, batch)
        self.nonfinite.skip(SkippedStep(self.step, *values, batch=batches))

    # -- one optimiser step ---------------------------------------------------------------

    def _perf_metrics(self, microbatches) -> dict[str, float]:
        """perf/* of the log window ending now (unimm.titan.step_metrics), and torchtitan's
        own throughput(tps), tflops and mfu(%) recomputed from the same numbers: FLOPs from
        the logged step's measured position mix instead of TYPICAL_MIX, and no MFU (NaN, null
        in metrics.jsonl) where the device's peak is unknown instead of A100's on CPU. Host
        counters and CPU batches only: no device sync."""
        processor = self.metrics_processor
        flops = step_metrics.flops_per_token(self._model_flops, microbatches)
        perf = step_metrics.window_metrics(
            tokens=processor.ntokens_since_last_log,
            window_s=time.perf_counter() - processor.time_last_log,
            # torchtitan's batch_generator times every next(data_iterator), read-ahead included
            steps=len(processor.data_loading_times) // self.gradient_accumulation_steps,
            data_wait_s=sum(processor.data_loading_times),
            mask_build_s=self._mask_build_s,
            mask_build_device_s=self._mask_spans.total_s(),
            flops_per_token=flops,
            peak=self._peak_flops,
            memory_gib=step_metrics.peak_memory_gib(self.device),
            non_data_parallel_size=processor.parallel_dims.non_data_parallel_size,
        )
        self._mask_build_s = 0.0
        processor.num_flops_per_token = max(1, round(flops))  # torchtitan's console line
        tps, mfu = perf["perf/tokens_per_s_per_device"], perf["perf/mfu"]
        torchtitan_keys = {
            "throughput(tps)": tps,
            "tflops": flops * tps / 1e12,
            "mfu(%)": math.nan if mfu is None else 100 * mfu,
        }
        # None -> NaN: TensorBoard's add_scalar takes NaN; JsonlLogger writes NaN as null
        return {**torchtitan_keys, **{k: math.nan if v is None else v for k, v in perf.items()}}

    def train_step(self, data_iterator):
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        microbatches = self._take_microbatches(data_iterator)
        provenance = [inputs.pop(PROVENANCE_KEY, None) for inputs, _ in microbatches]
        loss_state = self.loss_fn.state_dict() if hasattr(self.loss_fn, "state_dict") else None
        counts = self._global_counts(microbatches)
        losses = sum(
            self.forward_backward_step(input_dict=inputs, labels=labels, counts=counts, micro_index=m)
            for m, (inputs, labels) in enumerate(microbatches)
        )
        expert_loads = self._collect_expert_loads()
        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.config.training.max_norm,
            foreach=True,
            pp_mesh=None,
            ep_enabled=self.parallel_dims.ep_enabled,
        )
        if self.parallel_dims.dp_enabled:
            # every step: all ranks must see the same loss to take the same decision below
            dist.all_reduce(losses, group=self.parallel_dims.get_mesh("batch").get_group())
        logging = self.metrics_processor.should_log(self.step)
        if not logging:
            self._read_ahead(data_iterator)
        # The step's one wait on the device: the loss parts (global) and the gradient norm
        # (global), in one transfer. It is what logging steps already waited for (there it
        # replaces losses.tolist() and grad_norm.item()); the decision to skip must be taken
        # on the host before the optimizer step, so other steps now wait here too.
        values = torch.cat([losses.float(), grad_norm.reshape(1).float().to(losses.device)]).tolist()
        loss, loss_lm, loss_flow, balance, grad_norm_value = values
        self.checkpointer.maybe_wait_for_staging()
        if NonFiniteGuard.finite(values):
            self.nonfinite.passed()
            self.optimizers.step()
            self.lr_schedulers.step()
            if expert_loads is not None and self.moe_config.load_balance == "bias":
                update_expert_biases(self.moe_layers, expert_loads)
        else:
            self._skip_step(values, provenance, loss_state)

        if not logging:
            return
        perf = self._perf_metrics(microbatches)
        self.metrics_processor.log(
            self.step,
            loss,
            loss,
            grad_norm_value,
            extra_metrics={
                "loss_lm": loss_lm,
                "loss_flow": loss_flow,
                "lr": lr,
                "n_tokens_seen": self.ntokens_seen,
                "train/skipped_nonfinite_steps": self.nonfinite.skipped,
                **{f"data/{k}": v for k, v in self.dataloader.stats().items()},
                **self._moe_metrics(expert_loads, balance),
                **self.loss_fn.metrics(),
                **perf,
            },
        )
