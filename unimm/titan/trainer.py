"""The torchtitan Trainer for the two-headed objective: next-token CE + flow matching.

torchtitan's Trainer owns distributed init, FSDP, checkpoints (DCP), the LR schedule and
metrics; this subclass replaces only what differs from language modelling: the batch has
visual latents that are noised per frame, the attention mask comes from document/frame ids,
and the loss has two normalised parts that are logged separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torchtitan.distributed import utils as dist_utils
from torchtitan.trainer import Trainer

from unimm.data.batch import IGNORE_INDEX
from unimm.data.loader import MultimodalDataLoader
from unimm.flow import frame_noise, interpolate
from unimm.losses import TransfusionLoss
from unimm.masks import build_attention_mask
from unimm.model.moe import moe_layers, update_expert_biases
from unimm.titan import compat
from unimm.titan.metrics_jsonl import ExpertLoadLog, JsonlLogger
from unimm.tokenizer import Tokenizer


class UnimmTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        tokenizer: Tokenizer.Config = field(default_factory=Tokenizer.Config)
        dataloader: MultimodalDataLoader.Config = field(default_factory=MultimodalDataLoader.Config)
        loss: TransfusionLoss.Config = field(default_factory=TransfusionLoss.Config)
        metrics_file: str = "metrics.jsonl"
        """Per-step metrics as JSON lines, relative to dump_folder."""

    def __init__(self, config: Config):
        compat.apply()
        model_config = config.model_spec.model
        config.dataloader.bind_model(model_config)  # the loader checks its shards against both
        super().__init__(config)
        self.mask_backend = model_config.mask_backend(self.device)
        self.flow_shift = config.loss.flow.shift_factor(self.dataloader.manifest.tokens_per_frame, model_config.latent_dim)
        ffn = model_config.ffn
        self.moe_config = ffn.moe if ffn.kind == "moe" else None
        self.moe_layers = moe_layers(self.model_parts[0])
        self.router_loss_weight = (
            self.moe_config.aux_loss_coef if self.moe_config and self.moe_config.load_balance == "aux_loss" else 0.0
        )
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
        """Text targets, noised latent elements and positions in the whole global batch: the
        losses are sums divided by these, so gradients summed over ranks are global means."""
        latent_dim = self.model_config.latent_dim
        counts = torch.zeros(3, dtype=torch.float64)
        for inputs, labels in microbatches:
            counts[0] += (labels != IGNORE_INDEX).sum()
            counts[1] += inputs["denoise"].sum() * latent_dim
            counts[2] += labels.numel()
        counts = counts.to(self.device)
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(counts, group=self.parallel_dims.get_mesh("batch").get_group())
        return counts.clamp_min(1.0)

    def forward_backward_step(self, *, input_dict, labels, counts, micro_index: int) -> torch.Tensor:
        """Forward and backward of one microbatch; returns [loss, loss_lm, loss_flow,
        router balance] (detached, this rank's share of the global means)."""
        batch = {k: v.to(self.device) for k, v in input_dict.items()}
        labels = labels.to(self.device)
        self.ntokens_seen += labels.numel()
        mask = build_attention_mask(batch["document_ids"], batch["frame_ids"], self.mask_backend)
        latents, denoise = batch["latents"].float(), batch["denoise"]
        t_BL, eps = frame_noise(
            latents, batch["frame_ids"], denoise, self.flow_shift,
            self._row_seeds(micro_index, labels.shape[0]),
        )
        z_in = torch.where(denoise[..., None], interpolate(latents, eps, t_BL[..., None]), latents)
        lm_positions = labels != IGNORE_INDEX
        with self.train_context():
            logits, flow_pred, balance = self.model_parts[0](
                batch["tokens"], z_in, t_BL, batch["modality"], batch["positions"], mask,
                lm_positions, denoise,
            )
            # the router term is a mean over tokens: weight it by this microbatch's share
            balance = balance.mean() * (labels.numel() / counts[2])
            loss, parts = self.loss_fn(
                logits, labels[lm_positions], flow_pred, latents[denoise], eps[denoise],
                t_BL[denoise][:, None], counts, self.router_loss_weight * balance,
            )
            loss.backward()
        return torch.stack([loss.detach(), parts["loss_lm"], parts["loss_flow"], balance.detach()])

    def train_step(self, data_iterator):
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        microbatches = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
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
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()
        if expert_loads is not None and self.moe_config.load_balance == "bias":
            update_expert_biases(self.moe_layers, expert_loads)

        if not self.metrics_processor.should_log(self.step):
            return
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(losses, group=self.parallel_dims.get_mesh("batch").get_group())
        loss, loss_lm, loss_flow, balance = losses.tolist()
        if not math.isfinite(loss):
            raise RuntimeError(
                f"loss is not finite at step {self.step} (lm {loss_lm}, flow {loss_flow}); stopping"
            )
        self.metrics_processor.log(
            self.step,
            loss,
            loss,
            float(grad_norm.item()),
            extra_metrics={
                "loss_lm": loss_lm,
                "loss_flow": loss_flow,
                "lr": lr,
                "n_tokens_seen": self.ntokens_seen,
                **{f"data/{k}": v for k, v in self.dataloader.stats().items()},
                **self._moe_metrics(expert_loads, balance),
            },
        )
