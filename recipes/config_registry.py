"""Named training recipes, in torchtitan's config-registry form.

Each function returns a complete ``UnimmTrainer.Config``; the CLI (``--recipe NAME``) and
torchtitan's launcher (``--module unimm.recipes --config NAME``) both select them by name,
and any field can be overridden on the command line (``--training.steps 100``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC

from unimm.data.loader import MultimodalDataLoader
from unimm.flow import FlowMatchingConfig
from unimm.losses import TransfusionLoss
from unimm.titan.model_spec import model_registry
from unimm.titan.model_size import DataFittedTrainer, SizedTrainer, fit_to_data, sized
from unimm.titan.parallelize import UnimmTrainingConfig
from unimm.titan.trainer import UnimmTrainer


def _checkpoints(interval: int, keep_latest_k: int) -> CheckpointManager.Config:
    # Full state (optimizer and data position too) in every checkpoint, the last one
    # included, so that `unimm train` on the same folder resumes exactly.
    return CheckpointManager.Config(
        enable=True,
        interval=interval,
        keep_latest_k=keep_latest_k,
        last_save_model_only=False,
        initial_load_model_only=False,
    )


def _debug(flavor: str) -> UnimmTrainer.Config:
    return UnimmTrainer.Config(
        model_spec=model_registry(flavor),
        hf_assets_path=".",  # the byte tokenizer (tokenizer.path empty) needs no files
        dump_folder="./runs/debug_cpu",
        optimizer=default_adamw(lr=2e-3, weight_decay=0.01),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=20, decay_type="cosine", min_lr_factor=0.05
        ),
        training=TrainingConfig(
            local_batch_size=8,
            seq_len=256,
            steps=600,
            max_norm=1.0,
            mixed_precision_param="float32",
            disable_cuda_graphs=True,
            gc_freq=1000,
        ),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        debug=DebugConfig(seed=0),
        activation_checkpoint=None,
        checkpoint=_checkpoints(interval=100, keep_latest_k=2),
        metrics=MetricsProcessor.Config(log_freq=10, disable_color_printing=True),
        dataloader=MultimodalDataLoader.Config(),
        loss=TransfusionLoss.Config(flow=FlowMatchingConfig(shift="rae")),
    )


def debug_cpu() -> UnimmTrainer.Config:
    """Tiny shared-FFN model on procedural shapes/videos/text: the demo and the tests."""
    return _debug("debug")


def debug_cpu_modality() -> UnimmTrainer.Config:
    """debug_cpu with modality-specific FFNs (one text FFN, one vision FFN)."""
    return _debug("debug_modality")


def debug_cpu_moe() -> UnimmTrainer.Config:
    """debug_cpu with a mixture of 8 experts (top-2) in every layer."""
    return _debug("debug_moe")


def debug_cpu_mot() -> UnimmTrainer.Config:
    """debug_cpu as a Mixture of Transformers: per-modality attention projections, norms and
    FFNs, one global attention (``unimm convert dense-to-mot`` starts it from debug_cpu)."""
    return _debug("debug_mot")


def debug_cpu_dual_encoder() -> UnimmTrainer.Config:
    """debug_cpu_modality with a dual encoder (paper §6.3's baseline, as in Janus and Bagel):
    procedural images as raw-pixel 8x8 patches at 32 px to generate (latent_proj, flow head)
    and 4x4 patches at 16 px to understand (understanding_proj; 16 tokens each, 192 and 48
    wide), understanding images clean."""
    config = _debug("debug_dual_encoder")
    config.dataloader = MultimodalDataLoader.Config(understanding_image_size=16, understanding_patch=4)
    return config


def _paper_layout(parallelism: ParallelismConfig, ffn) -> ParallelismConfig:
    """The paper recipes' parallel layout, derived from the job they are launched in (torchrun's
    WORLD_SIZE and LOCAL_WORLD_SIZE; unimm.titan.launch.job_shape). Dense, modality-FFN and MoT
    models: HSDP, each node a replica sharded over its own GPUs (128 GPUs: 16 x 8), so the
    parameter all-gathers stay on NVLink and only gradients cross nodes. MoE: FSDP over every
    GPU with expert parallelism inside a node (64 GPUs: ep 8, experts sharded 8 x 8 over ep x
    efsdp), since a node-local replica of E=1008 experts would not fit. Any
    --parallelism.* option given on the command line wins."""
    from unimm.titan.launch import expert_parallel_degree, hsdp_degrees, job_shape

    shape = job_shape()
    if ffn.kind == "moe":
        parallelism.expert_parallel_degree = expert_parallel_degree(shape, ffn.moe.num_experts)
    else:
        parallelism.data_parallel_replicate_degree, _ = hsdp_degrees(shape)
    parallelism.data_parallel_shard_degree = -1  # the GPUs of a node (HSDP) or all of them
    return parallelism


def _paper(flavor: str) -> UnimmTrainer.Config:
    # App. E.2: AdamW, peak LR 3e-4, 1000 warmup steps, cosine decay to 5% of peak,
    # sequence 4096, 4 rows per GPU (2M tokens a step on 128 GPUs).
    model_spec = model_registry(flavor)
    return UnimmTrainer.Config(
        model_spec=model_spec,
        hf_assets_path=".",  # the vocabulary comes from --tokenizer.path (e.g. Llama 3's tokenizer.json)
        dump_folder=f"./runs/{flavor}",
        optimizer=default_adamw(lr=3e-4),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=1000, decay_type="cosine", min_lr_factor=0.05
        ),
        # float8 is an option, off: --training.float8.enable (unimm.titan.parallelize)
        training=UnimmTrainingConfig(
            local_batch_size=4, seq_len=4096, steps=100_000, max_norm=1.0, disable_cuda_graphs=True
        ),
        parallelism=_paper_layout(ParallelismConfig(spmd_backend="partial_dtensor"), model_spec.model.ffn),
        debug=DebugConfig(seed=0),
        activation_checkpoint=SelectiveAC.Config(),
        checkpoint=_checkpoints(interval=1000, keep_latest_k=3),
        metrics=MetricsProcessor.Config(log_freq=10, enable_tensorboard=True),
        # The loader's default source_weights are the paper's token shares (App. E.8) under the
        # procedural names; a real mixture names its own sources (README, "Data").
        dataloader=MultimodalDataLoader.Config(),
        loss=TransfusionLoss.Config(flow=FlowMatchingConfig(shift="rae")),
    )


def dense_1b5() -> UnimmTrainer.Config:
    """Paper §2.2 dense baseline: 16 layers, d_model 2048, shared FFN (1.50B)."""
    return _paper("dense_1b5")


def modality_ffn_2b3() -> UnimmTrainer.Config:
    """Paper default: modality-specific FFNs, 2.30B total / 1.50B active."""
    return _paper("modality_ffn_2b3")


def mot_2b5() -> UnimmTrainer.Config:
    """Paper §6.3's Mixture of Transformers on the 1.5B backbone: text and vision copies of every
    block (attention projections, norms, FFN) under one global attention, 2.47B total / 1.50B
    active. Starts from scratch, or from a dense_1b5 / modality_ffn_2b3 checkpoint through
    ``unimm convert dense-to-mot``."""
    return _paper("mot_2b5")


def dual_encoder_2b3() -> UnimmTrainer.Config:
    """Paper §6.3's dual-encoder baseline on modality_ffn_2b3 (2.30B total / 1.50B active):
    SD-VAE latents (16 wide) generated by the flow head, SigLIP 2 So400m features (1152 wide)
    read at I->T images through a second input projection. Needs --dataloader.shards: a mixture
    whose image-text sources were written with --encoder sd_vae --understanding-encoder siglip2
    (README, "Data"); source weights from its manifest."""
    config = _paper("dual_encoder_2b3")
    config.dataloader = MultimodalDataLoader.Config(source_weights={})
    return config


# The paper's MoE sweeps (App. E.7), one recipe per flavor of unimm.titan.model_spec.
def _register_moe_recipes() -> None:
    from unimm.titan.model_spec import FLAVORS

    for flavor in FLAVORS:
        if flavor.startswith("moe_"):
            recipe = lambda flavor=flavor: _paper(flavor)  # noqa: E731
            recipe.__name__ = recipe.__qualname__ = flavor
            recipe.__module__ = __name__
            recipe.__doc__ = f"Paper MoE configuration {flavor} (App. E.7)."
            globals()[flavor] = recipe


_register_moe_recipes()


# Paper §6.3 (Figure 21): design choices stacked one at a time from a Transfusion baseline,
# every step trained with the same hyperparameters, data and tokens. Each row: the recipe's
# step name, the model (paper size, CPU size), the visual representation and the flow
# prediction target. The representation sets the latent width: SD-VAE folded 2x2 is 16 wide,
# SigLIP 2 So400m 1152; on CPU the procedural images stand in, as raw-pixel patches that keep
# the same contrast (a low-width "VAE": 4x4 patches of 16 px images, 48 wide; a high-width
# "semantic encoder": 8x8 patches of 32 px images, 192 wide; both 16 tokens a frame).
@dataclass(frozen=True)
class _StackStep:
    name: str
    paper_flavor: str
    cpu_flavor: str
    encoder: Literal["vae", "semantic", "dual"]
    prediction: Literal["v", "x"] = "v"


_STACK = (
    _StackStep("transfusion", "dense_1b5", "debug", "vae"),  # shared FFN, SD-VAE, v-pred
    _StackStep("modality_ffn", "modality_ffn_2b3", "debug_modality", "vae"),
    _StackStep("siglip2", "modality_ffn_2b3", "debug_modality", "semantic"),
    _StackStep("moe", "moe_e256_shared_per_modality", "debug_moe_per_modality", "semantic"),
    _StackStep("x_pred", "moe_e256_shared_per_modality", "debug_moe_per_modality", "semantic", "x"),  # final
    # branches: another encoder layout at the encoder step, another separation at the MoE step
    _StackStep("dual_encoder", "dual_encoder_2b3", "debug_dual_encoder", "dual"),
    _StackStep("mot", "mot_2b5", "debug_mot", "semantic"),
)
# (latent width, understanding width) of each representation, paper size and CPU size
_STACK_WIDTHS = {"vae": ((16, 0), (48, 0)), "semantic": ((1152, 0), (192, 0)), "dual": ((16, 1152), (48, 192))}


def _stack(step: _StackStep, cpu: bool) -> UnimmTrainer.Config:
    config = _debug(step.cpu_flavor) if cpu else _paper(step.paper_flavor)
    model = config.model_spec.model
    model.latent_dim, model.understanding_dim = _STACK_WIDTHS[step.encoder][int(cpu)]
    if cpu:
        # procedural raw pixels at the widths above (dataloader.patch: 3 * patch^2 wide)
        small, large = dict(image_size=16, patch=4), dict(image_size=32, patch=8)
        generation = small if step.encoder in ("vae", "dual") else large
        understanding = (
            dict(understanding_image_size=32, understanding_patch=8) if step.encoder == "dual" else {}
        )
        config.dataloader = MultimodalDataLoader.Config(**generation, **understanding)
    elif step.encoder == "dual":
        config.dataloader = MultimodalDataLoader.Config(source_weights={})
    config.loss.flow.prediction = step.prediction
    config.dump_folder = f"./runs/stack_{'cpu_' if cpu else ''}{step.name}"
    return config


def _register_stack_recipes() -> None:
    for step in _STACK:
        for cpu in (False, True):
            name = f"stack_{'cpu_' if cpu else ''}{step.name}"
            recipe = lambda step=step, cpu=cpu: _stack(step, cpu)  # noqa: E731
            recipe.__name__ = recipe.__qualname__ = name
            recipe.__module__ = __name__
            where = "CPU-sized stand-in" if cpu else "paper size; needs --dataloader.shards"
            recipe.__doc__ = (
                f"Paper §6.3 stack, step {step.name!r} ({where}): {step.cpu_flavor if cpu else step.paper_flavor}, "
                f"{step.encoder} latents, {step.prediction}-prediction."
            )
            globals()[name] = recipe


_register_stack_recipes()


def debug_sweep() -> SizedTrainer.Config:
    """debug_cpu resizable from the command line (``--model_size.*``) for IsoFLOP sweeps on CPU;
    ``unimm isoflop plan`` writes the sizes, steps and warmup. A 32-wide timestep MLP keeps the
    visual adapters small beside the smallest models; one checkpoint, at the end."""
    base = _debug("debug")
    base.model_spec.model.time_freq_dim = 32
    base.checkpoint = _checkpoints(interval=1_000_000, keep_latest_k=2)
    return sized(base)


def dense_sweep() -> SizedTrainer.Config:
    """dense_1b5 resizable from the command line (``--model_size.*``): paper-scale IsoFLOP
    sweeps (``unimm isoflop plan --recipe dense_sweep ...``; needs ``--dataloader.shards``)."""
    return sized(_paper("dense_1b5"))


def mixture() -> DataFittedTrainer.Config:
    """Any mixture the data jobs wrote (--dataloader.shards DIR), on the paper's default model.

    The model is modality_ffn_2b3's (modality FFNs, 2.30B total / 1.50B active) fitted to the
    data (unimm.titan.model_size.fit_to_data): vocabulary from --tokenizer.path, latent width
    from the shards' manifest, max_seq_len = --training.seq_len; source weights from the
    manifest (the paper's modality shares, split by the sources' tokens; loader.py).
    ``--model_size.*`` resizes it, ``--dataloader.source_weights NAME W ...`` sets the mixture."""
    base = _paper("modality_ffn_2b3")
    base.dump_folder = "./runs/mixture"
    base.dataloader = MultimodalDataLoader.Config(source_weights={})
    return fit_to_data(base)


# `make demo` (issue 15): learning a person can see in a few CPU minutes. The shards are
# written first by the Makefile's data step (DEMO_SHARDS, data_pipelines/write_shards.py);
# tools/demo_targets.py measures the targets on held-out single-object scenes.
DEMO_SHARDS = "./runs/demo_data_centred"


def demo() -> SizedTrainer.Config:
    """The `make demo` run: debug_cpu's model, x-prediction, 1800 steps on one-shape images
    with their captions ("a red circle", both directions; runs/demo_data_centred, written by
    the Makefile); resizable (``--model_size.*``). The shape is drawn large near the centre
    (source single_object_centred): placed anywhere at about half that size, it spans one or
    two 8x8 patches and 1400 steps learnt its colour but not its shape (9% text to image)."""
    config = _debug("debug")
    config.dump_folder = "./runs/demo"
    # text-to-image shapes come last: 31% right at step 700, 50% at 1400, 75% at 1800
    config.training.steps = 1800
    config.dataloader = MultimodalDataLoader.Config(
        shards=DEMO_SHARDS,
        source_weights={"single_object_centred": 1.0},
        # Captions read clean images, as at sampling time, so the shape is always visible;
        # that leaves the flow loss to the generation direction, which gets most pairs.
        clean_conditioning_frames=True,
        p_understanding=0.4,
    )
    # A 192-wide patch does not fit through the 128-wide model: a velocity (which holds the
    # noise) comes out speckled, a clean image (few degrees of freedom) does not (JiT).
    config.loss.flow.prediction = "x"
    # x-prediction's loss is large (the error divided by 1 - t); at the default 3.0 its
    # gradient drowned the captions' in the shared layers; 2.0 with 30% captioning pairs drew
    # worse shapes too (34% against 50% at step 1400, captions 81% against 97%), and 0.5 drew
    # worse shapes (25%) for perfect captions.
    config.loss.lambda_flow = 1.0
    config.checkpoint = _checkpoints(interval=900, keep_latest_k=2)
    return sized(config)


# World modeling on CPU (issue 14, paper §5): a small model on the procedural navigation world.
# The paper's mixture idea (general data beside in-domain data) with the in-domain share the
# CPU budget needs: at 30% navigation samples, 600 steps gave noise (docs/world_model.md).
WORLD_MODEL_SOURCES = {"text": 0.05, "image_text": 0.05, "video": 0.05, "action": 0.85}


def world_model_cpu() -> UnimmTrainer.Config:
    """debug_cpu_modality trained as a navigation world model on a CPU (paper §5's mixture
    idea: a little general data, text, shapes and videos, beside mostly 4-context-frame
    navigation samples); 16 px views in 4x4 raw-pixel patches (16 tokens, 48 wide), action
    context frames clean as the planner feeds them, x-prediction (docs/world_model.md)."""
    config = _debug("debug_modality")
    model = config.model_spec.model
    # narrower and shallower than debug_cpu: CEM rolls 120 candidates x 8 frames x 3 repeats out
    model.dim, model.n_layers, model.ffn.hidden_dim, model.latent_dim = 96, 3, 288, 48
    config.dump_folder = "./runs/world_model_cpu"
    config.dataloader = MultimodalDataLoader.Config(
        image_size=16, patch=4, num_actions=4096, source_weights=dict(WORLD_MODEL_SOURCES),
        clean_conditioning_frames=True,
    )
    # The next view is nearly a function of the context and the action: predicting the clean
    # frame (JiT) gives it in one step, where a velocity carries the noise along; training
    # times are shifted toward noise, where that prediction is made (the rae shift of a
    # 16 x 48 latent, 0.43, would move them toward clean frames).
    config.loss.flow.prediction = "x"
    config.loss.flow.shift, config.loss.flow.shift_value = "sd3", 3.0
    config.training.steps = 2000
    config.checkpoint = _checkpoints(interval=500, keep_latest_k=2)
    return config
