"""Staged training (unimm.titan.param_groups, unimm.titan.stage) and fine-tuning with the loss
on answers only (unimm.data.sequences.answer_document).

Everything but the last test runs in this process: the optimizer container is built on a
small model exactly as the trainer builds it (``config.optimizer.build(model_parts=...)``).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

from conftest import starting_weights, train_recipe
from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT, VISION
from unimm.data.sequences import LayoutSettings, build_document
from unimm.errors import ConfigError
from unimm.masks import build_attention_mask
from unimm.model.params import meta_model
from unimm.titan.model_spec import FLAVORS
from unimm.titan.param_groups import GROUPS, canonical_name, parameter_parts
from unimm.titan.stage import StageConfig, StagedOptimizersContainer, prepare_stage_start, resolve_init_from
from unimm.tokenizer import Tokenizer


def _moe_variant(shared: str):
    config = FLAVORS["debug_moe"]()
    config.ffn.moe = dataclasses.replace(config.ffn.moe, shared=shared, top_k=3)
    return config


MODELS = {
    "shared": (lambda: FLAVORS["debug"](), {"backbone"}),
    "modality": (lambda: FLAVORS["debug_modality"](), {"text", "vision"}),
    "moe": (lambda: FLAVORS["debug_moe"](), {"experts"}),
    "moe_shared_global": (lambda: _moe_variant("global"), {"experts"}),
    "moe_shared_per_modality": (lambda: _moe_variant("per_modality"), {"text", "vision", "experts"}),
    "mot": (lambda: FLAVORS["debug_mot"](), {"text", "vision"}),
}


# -- the mapping -------------------------------------------------------------------------------


def _wrapped(model):
    """Blocks wrapped as torchtitan may wrap them: activation checkpointing, a torch.compile
    wrapper (``_orig_mod``), both."""
    layers = model.layers
    layers.register_module("0", checkpoint_wrapper(layers["0"]))
    layers.register_module("1", torch.compile(layers["1"]))
    layers.register_module("2", torch.compile(checkpoint_wrapper(layers["2"])))
    return model


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_parameter_is_in_exactly_one_group(kind):
    make, ffn_groups = MODELS[kind]
    model = meta_model(make())
    parts = parameter_parts(model)
    assert parts.keys() == dict(model.named_parameters()).keys()
    seen = set()
    for name, param in model.named_parameters():
        groups = {p.group for p in parts[name]}
        assert groups <= set(GROUPS)
        seen |= groups
        if len(parts[name]) == 1 and parts[name][0].rows is None:
            continue
        # a stacked tensor: its row ranges cover dim 0 exactly once
        rows = sorted(r for p in parts[name] for r in p.rows)
        assert rows == list(range(param.shape[0])), name
    shared = {"backbone"} if kind != "mot" else set()
    assert seen == {"embeddings", "lm_head", "flow_head", "latent_proj", "time_embedding"} | shared | ffn_groups
    ffn = {name: {p.group for p in ps} for name, ps in parts.items() if ".feed_forward." in name}
    assert set().union(*ffn.values()) == ffn_groups
    # attention and norms are shared, except in a Mixture of Transformers (text row 0, vision row 1)
    for name in ("layers.0.attention.wq.weight", "layers.0.attention_norm.weight", "norm.weight"):
        assert {p.group for p in parts[name]} == (shared or {"text", "vision"}), name
    if kind == "mot":
        assert not any(p.group == "backbone" for ps in parts.values() for p in ps)
        assert [(p.group, p.rows) for p in parts["layers.1.attention.wo.weight"]] == [("text", (0,)), ("vision", (1,))]

    # the same groups under torchtitan's wrappers (names keep their wrapper segments)
    wrapped = parameter_parts(_wrapped(meta_model(make())))
    assert any("_checkpoint_wrapped_module" in n for n in wrapped) and any("_orig_mod" in n for n in wrapped)
    assert {canonical_name(n): ps for n, ps in wrapped.items()} == parts


def test_every_registered_flavor_maps():
    for flavor, make in FLAVORS.items():
        parts = parameter_parts(meta_model(make()))  # a module no rule knows raises
        groups = {p.group for ps in parts.values() for p in ps}
        assert groups >= {"embeddings", "lm_head"} and ("backbone" in groups or {"text", "vision"} <= groups), flavor


def test_modality_ffn_rows_are_text_then_vision():
    parts = parameter_parts(meta_model(FLAVORS["debug_modality"]()))
    assert [(p.group, p.rows) for p in parts["layers.3.feed_forward.experts.w2"]] == [("text", (0,)), ("vision", (1,))]
    per_modality = parameter_parts(meta_model(_moe_variant("per_modality")))
    assert [(p.group, p.rows) for p in per_modality["layers.0.feed_forward.experts.w1"]] == [
        ("text", (0,)), ("vision", (1,)), ("experts", tuple(range(2, 8)))
    ]
    assert {p.group for p in per_modality["layers.0.feed_forward.router.gate.weight"]} == {"experts"}


# -- freezing and learning rates ---------------------------------------------------------------


def _model(flavor: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FLAVORS[flavor]().build()
    model.init_weights()
    with torch.no_grad():
        model.flow_head.weight.normal_(std=0.02)  # zero-initialised: vision outputs would get no gradient
    return model


def _optimizers(model, stage: StageConfig, **adamw):
    config = StagedOptimizersContainer.adopt(default_adamw(lr=1e-2, weight_decay=0.1, **adamw), stage)
    return config.build(model_parts=[model])


def _loss(model, seed: int) -> torch.Tensor:
    """Loss of a batch with text and one image per row, so every FFN expert gets a gradient."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 24
    modality = torch.full((B, L), TEXT)
    modality[:, 8:16] = VISION
    frames = torch.where(modality == VISION, 0, NO_FRAME)
    mask = build_attention_mask(torch.zeros(B, L, dtype=torch.long), frames, "sdpa")
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    latents = torch.randn(B, L, cfg.latent_dim, generator=g)
    t = torch.rand(B, L, generator=g)
    positions = torch.arange(L).expand(B, L)
    text, vision = modality == TEXT, modality == VISION
    logits, flow, balance = model(tokens, latents, t, modality, positions, mask, text, vision)
    targets = torch.randint(0, cfg.vocab_size, (int(text.sum()),), generator=g)
    return F.cross_entropy(logits, targets) + flow.square().mean() + balance.sum()


def _train(model, optimizers, steps: int, schedulers=None) -> None:
    for step in range(steps):
        optimizers.zero_grad()
        _loss(model, step).backward()
        optimizers.step()
        if schedulers is not None:
            schedulers.step()


def _optimized(optimizers) -> dict[int, dict]:
    """id(param) -> its param group, over all optimizers."""
    return {id(p): group for opt in optimizers for group in opt.param_groups for p in group["params"]}


def test_frozen_groups_are_out_of_the_optimizer_and_never_change():
    model = _model("debug_modality")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = StageConfig(freeze=["embeddings,text", "heads"])
    optimizers = _optimizers(model, stage)
    params = dict(model.named_parameters())
    optimized = _optimized(optimizers)

    for name in ("tok_embeddings.weight", "lm_head.weight", "flow_head.weight", "flow_head.bias"):
        assert not params[name].requires_grad and id(params[name]) not in optimized, name
    experts = [n for n in params if ".feed_forward.experts." in n]
    assert experts and all(params[n].requires_grad and id(params[n]) in optimized for n in experts)

    optimizers.zero_grad()
    _loss(model, 0).backward()
    for name in experts:  # the frozen text rows are out of the gradient (and the gradient norm)
        grad = params[name].grad
        assert torch.count_nonzero(grad[0]) == 0 and torch.count_nonzero(grad[1]) > 0, name
    optimizers.step()
    _train(model, optimizers, steps=3)  # weight decay 0.1 would move anything it touched

    after = dict(model.named_parameters())
    for name in ("tok_embeddings.weight", "lm_head.weight", "flow_head.weight", "flow_head.bias"):
        assert torch.equal(after[name], before[name]), name
    for name in experts:
        assert torch.equal(after[name][0], before[name][0]), f"{name}: text rows moved"
        assert not torch.equal(after[name][1], before[name][1]), f"{name}: vision rows did not train"
    for name in ("layers.0.attention.wq.weight", "latent_proj.weight", "norm.weight"):
        assert not torch.equal(after[name], before[name]), name
    # no optimizer state for frozen parameters, state for the rest
    state = optimizers.state_dict()
    assert not any(k.startswith(("state.tok_embeddings.", "state.lm_head.")) for k in state)
    assert "state.layers.0.feed_forward.experts.w1.exp_avg" in state


def test_frozen_experts_keep_their_routing_biases():
    config = FLAVORS["debug_moe"]()
    config.ffn.moe = dataclasses.replace(config.ffn.moe, load_balance="bias")
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    _optimizers(model, StageConfig(freeze=["experts"]))
    from unimm.model.moe import moe_layers

    assert all(layer.config.bias_update_rate == 0.0 for layer in moe_layers(model))
    assert config.ffn.moe.bias_update_rate > 0  # the recipe's config is not changed


def test_lr_multipliers_hold_through_the_schedule():
    model = _model("debug")
    stage = StageConfig(lr_multipliers={"heads": 3.0, "embeddings": 0.5, "lm_head": 4.0})
    optimizers = _optimizers(model, stage)
    schedulers = LRSchedulersContainer.Config(warmup_steps=3, decay_type="cosine", min_lr_factor=0.05).build(
        optimizers=optimizers, training_steps=10
    )
    (optimizer,) = optimizers.optimizers
    groups = optimizer.param_groups
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert groups[0] is by_name["layers.0.attention.wq.weight"]  # the logged lr is the base one
    expected = {
        "layers.0.attention.wq.weight": 1.0,
        "tok_embeddings.weight": 0.5,
        "lm_head.weight": 4.0,  # a group's own entry beats the alias holding it
        "flow_head.weight": 3.0,
        "time_embedding.mlp_in.weight": 1.0,
    }
    assert len(groups) == 4
    seen = []
    for step in range(10):
        base = by_name["layers.0.attention.wq.weight"]["lr"]
        seen.append(base)
        for name, factor in expected.items():
            assert by_name[name]["lr"] == pytest.approx(factor * base, rel=1e-12), (step, name)
            assert by_name[name]["initial_lr"] == pytest.approx(factor * 1e-2, rel=1e-12)
        optimizers.step()  # the schedule needs no gradients
        schedulers.step()
    assert len(set(seen)) > 5 and max(seen) == pytest.approx(1e-2)  # the schedule did move


def test_optimizer_state_round_trip_resumes_exactly():
    stage = StageConfig(freeze=["text"], lr_multipliers={"heads": 3.0})
    model = _model("debug_modality")
    twin = copy.deepcopy(model)
    optimizers = _optimizers(model, stage)
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=10)
    _train(model, optimizers, steps=1, schedulers=schedulers)

    # a resumed process: same model weights, fresh optimizer built from the config, state loaded
    twin.load_state_dict(model.state_dict())
    resumed = _optimizers(twin, stage)
    resumed_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=resumed, training_steps=10)
    resumed.load_state_dict(copy.deepcopy(optimizers.state_dict()))  # as read back from disk
    resumed_schedulers.load_state_dict(schedulers.state_dict())
    _train(model, optimizers, steps=2, schedulers=schedulers)
    _train(twin, resumed, steps=2, schedulers=resumed_schedulers)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_stage_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown parameter group 'embedding'"):
        _optimizers(_model("debug"), StageConfig(freeze=["embedding"]))
    with pytest.raises(ConfigError, match="nothing would train"):
        _optimizers(_model("debug"), StageConfig(freeze=["embeddings", "backbone", "heads", "adapters"]))
    with pytest.raises(ConfigError, match="one tensor has one learning rate"):
        _optimizers(_model("debug_modality"), StageConfig(lr_multipliers={"vision": 2.0}))
    with pytest.raises(ConfigError, match="frozen groups"):
        _optimizers(_model("debug"), StageConfig(freeze=["heads"], lr_multipliers={"lm_head": 2.0}))
    with pytest.raises(ConfigError, match="positive"):
        _optimizers(_model("debug"), StageConfig(lr_multipliers={"heads": 0.0}))


def test_without_a_stage_the_optimizer_is_torchtitans():
    model = _model("debug")
    optimizers = _optimizers(model, StageConfig())
    (optimizer,) = optimizers.optimizers
    assert len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_stage_options_on_the_command_line():
    from unimm.titan.launch import load_recipe

    config = load_recipe("debug_cpu", [
        "--stage.freeze", "embeddings,backbone", "--stage.lr_multipliers", "heads", "10", "adapters", "0.5",
        "--stage.init_from", "runs/pretrain", "--dataloader.loss_on", "answers",
    ])
    assert config.stage.frozen_groups() == {"embeddings", "backbone"}
    assert config.stage.lr_multipliers == {"heads": 10.0, "adapters": 0.5}
    assert config.stage.init_from == "runs/pretrain"
    assert config.dataloader.loss_on == "answers"


# -- loss on answers only ----------------------------------------------------------------------


def _qa_sample(tok, kind: str, question: str, solution: str, **extra):
    text = f"{question}\n{solution}"
    sample = {"kind": kind, "tokens": np.array(tok.encode(text)), "key": "k", "shard": "s", **extra}
    if kind == "image_text":
        sample.update(directions=["i2t"], latents=np.ones((1, 4, 3), np.float32), view="understanding",
                      question_direct=question, solution_direct=solution)
    else:
        sample.update(latents=None, view="text", question=question, solution=solution)
    return sample


def _targets(doc) -> list[int]:
    return doc.labels[doc.labels != IGNORE_INDEX].tolist()


ANSWERS = LayoutSettings(loss_on="answers")


@pytest.mark.parametrize("kind", ["image_text", "text"])
def test_answer_loss_covers_only_the_answer_and_its_eos(kind):
    tok = Tokenizer()
    sample = _qa_sample(tok, kind, "How many circles are there?", "Answer: 3", answer="3")
    rng = np.random.default_rng(0)
    doc = build_document(sample, tok, rng, latent_dim=3, layout=ANSWERS)
    assert _targets(doc) == tok.encode("Answer: 3") + [tok.eos_id]
    kept = np.flatnonzero(doc.labels != IGNORE_INDEX)
    assert tok.decode(doc.tokens[kept + 1]) == "Answer: 3"  # each kept position predicts the next token
    assert not doc.denoise.any()  # no flow loss in this mode
    full = build_document(sample, tok, np.random.default_rng(0), latent_dim=3)
    assert len(_targets(full)) > len(_targets(doc))  # the default trains on the question too
    assert np.array_equal(full.tokens, doc.tokens)


def test_answer_loss_on_other_documents():
    tok = Tokenizer()
    rng = np.random.default_rng(0)
    latents = np.ones((1, 4, 3), np.float32)
    caption = {"kind": "image_text", "directions": ["i2t", "t2i"], "tokens": np.array(tok.encode("a red circle")),
               "latents": latents}
    doc = build_document(caption, tok, rng, latent_dim=3, layout=ANSWERS)
    assert doc.modality[1] == TEXT and doc.modality[2] == VISION  # laid out image first whatever p_understanding
    assert _targets(doc) == tok.encode("a red circle") + [tok.eos_id]  # the caption answers the image
    plain = {"kind": "text", "tokens": np.array(tok.encode("just text")), "latents": None}
    assert _targets(build_document(plain, tok, rng, latent_dim=3, layout=ANSWERS)) == []
    generation = {**caption, "directions": ["t2i"]}
    doc = build_document(generation, tok, rng, latent_dim=3, layout=ANSWERS)
    assert _targets(doc) == [] and not doc.denoise.any()
    with_flow = dataclasses.replace(ANSWERS, answer_flow_loss=True)
    assert build_document(generation, tok, rng, latent_dim=3, layout=with_flow).denoise.any()


def test_answer_found_with_a_sentencepiece_vocabulary(sentencepiece_model):
    tok = Tokenizer(Tokenizer.Config(path=str(sentencepiece_model)))
    sample = _qa_sample(tok, "text", "Where is the red circle relative to the blue square?",
                        "The red circle is to the north of it. Answer: north.")
    doc = build_document(sample, tok, np.random.default_rng(0), latent_dim=3, layout=ANSWERS)
    targets = _targets(doc)
    assert targets[-1] == tok.eos_id
    assert tok.decode(targets[:-1]).strip() == "The red circle is to the north of it. Answer: north."


# -- starting a stage from another run -------------------------------------------------------


def _distinct_weights(flavor: str) -> dict[str, torch.Tensor]:
    """Weights no initialisation of the recipe reproduces."""
    weights = starting_weights(FLAVORS[flavor]())
    generator = torch.Generator().manual_seed(123)
    return {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in weights.items()}


def _run_with_checkpoints(root, flavor, steps=(3, 7)):
    from unimm.convert.dcp_io import save_model_checkpoint

    weights = _distinct_weights(flavor)
    for step in steps:
        save_model_checkpoint(weights, root / "checkpoint" / f"step-{step}")
    return weights


def test_init_from_resolves_the_newest_checkpoint_and_refuses_another_architecture(tmp_path, monkeypatch):
    from unimm.titan.launch import load_recipe

    source = tmp_path / "pretrain"
    _run_with_checkpoints(source, "debug_modality")
    (source / "checkpoint" / "step-9").mkdir()  # an unfinished save: no .metadata
    newest = source / "checkpoint" / "step-7"
    assert resolve_init_from(str(source)) == newest
    assert resolve_init_from(str(source / "checkpoint")) == newest
    assert resolve_init_from(str(source / "checkpoint" / "step-3")) == source / "checkpoint" / "step-3"
    monkeypatch.chdir(tmp_path)
    assert resolve_init_from("pretrain") == newest  # relative in, absolute out
    with pytest.raises(ConfigError, match="no checkpoint there"):
        resolve_init_from(str(tmp_path))

    config = load_recipe("debug_cpu_modality", ["--stage.init_from", str(source), "--dump_folder", str(tmp_path / "a")])
    prepare_stage_start(config)
    assert config.checkpoint.initial_load_path == str(newest) and config.checkpoint.initial_load_model_only

    for option in (["--stage.init_from", str(source)], ["--checkpoint.initial_load_path", str(newest)]):
        config = load_recipe("debug_cpu", [*option, "--dump_folder", str(tmp_path / "b")])
        with pytest.raises(ConfigError, match="another architecture.*missing layers.0.feed_forward.ffn.w1.weight"):
            prepare_stage_start(config)

    # a run that already has checkpoints resumes from them; init_from is not used
    own = tmp_path / "c"
    _run_with_checkpoints(own, "debug", steps=(2,))
    config = load_recipe("debug_cpu", ["--stage.init_from", str(source), "--dump_folder", str(own)])
    prepare_stage_start(config)
    assert config.checkpoint.initial_load_path is None


@pytest.mark.slow
def test_a_stage_starts_from_another_runs_weights_with_groups_frozen(tmp_path, data_cache):
    """One torchrun launch, 2 FSDP ranks: the modality FFN's 2 experts are sharded by row, so
    the text rows live on rank 0 and the vision rows on rank 1."""
    from torch.distributed.checkpoint import FileSystemReader

    from unimm.convert.dcp_io import DcpCheckpoint

    source = tmp_path / "pretrain"
    weights = _run_with_checkpoints(source, "debug_modality", steps=(5,))
    out = tmp_path / "finetune"
    train_recipe(
        "debug_cpu_modality", out, data_cache,
        "--stage.init_from", str(source), "--stage.freeze", "embeddings,text",
        "--stage.lr_multipliers", "heads", "3", "--dataloader.loss_on", "answers", "--dataloader.answer_flow_loss",
        "--training.local_batch_size", "2", "--checkpoint.interval", "2",
        steps=2, nproc=2,
    )
    step = out / "checkpoint" / "step-2"
    trained = DcpCheckpoint(step).load()
    assert torch.equal(trained["tok_embeddings.weight"], weights["tok_embeddings.weight"])  # loaded, frozen
    for name in (n for n in weights if ".feed_forward.experts." in n):
        assert torch.equal(trained[name][0], weights[name][0]), f"{name}: text rows moved"
        assert not torch.equal(trained[name][1], weights[name][1]), f"{name}: vision rows did not train"
    for name in ("layers.0.attention.wq.weight", "latent_proj.weight"):
        assert not torch.equal(trained[name], weights[name]), name
        # started from the source run: one small step away from its weights, not from an init
        assert (trained[name] - weights[name]).abs().max() < 0.05, name
    saved = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert "optimizer.state.layers.0.feed_forward.experts.w1.exp_avg" in saved
    assert not any(k.startswith("optimizer.state.tok_embeddings.") for k in saved)
