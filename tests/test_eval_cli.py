"""``unimm eval``: every report from a tiny trained MoE run, each suite's numbers on hand-made
cases (a zero head, a hand-set router, separable features, ground-truth images), bad inputs."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import small_run_options, train_recipe
from unimm.cli import main
from unimm.data_pipelines import probes as probe_sets
from unimm.data_pipelines import procedural
from unimm.data_pipelines.raw_pixels import RawPixels
from unimm.evaluation import generation, heldout, moe_capture, understanding
from unimm.evaluation.captioning import score_caption
from unimm.evaluation.probes import probe_accuracy
from unimm.flow import FlowMatchingConfig
from unimm.tokenizer import build_tokenizer
from unimm.titan.model_spec import FLAVORS

FAST = ["--samples", "1", "--prompts", "1", "--captions", "2", "--probe-samples", "8", "--heldout-documents", "4",
        "--euler-steps", "2", "--timesteps", "2"]
SUITES = ("perplexity", "diffusion", "understanding", "generation", "captioning", "probes", "moe")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("eval") / "run"
    train_recipe("debug_cpu_moe", out, data_cache, steps=2)
    return out


@pytest.fixture(scope="module")
def initial_run(tmp_path_factory, data_cache):
    """A run folder as `unimm train` leaves it, without training: debug_cpu's initial weights as
    checkpoint step-2 and the run.json of a launch with the small test options."""
    from unimm.convert.dcp_io import save_model_checkpoint

    out = tmp_path_factory.mktemp("eval_initial") / "run"
    save_model_checkpoint(_model().state_dict(), out / "checkpoint" / "step-2")
    argv = ["unimm", "train", "--recipe", "debug_cpu", "--out", str(out), *small_run_options(data_cache)]
    (out / "run.json").write_text(json.dumps({"settings": {"recipe": "debug_cpu"}, "launches": [{"argv": argv}]}))
    return out


@pytest.mark.slow
def test_eval_writes_every_report(moe_run, capsys):
    assert main(["eval", "--run", str(moe_run), "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["recipe"] == "debug_cpu_moe"
    assert set(summary["suites"]) == set(SUITES)  # the MoE suite applies: the model has routers
    folder = moe_run / "eval" / "step-2"
    for name in SUITES:
        report = json.loads((folder / f"{name}.json").read_text())
        for png in report.get("figures", []):
            assert (folder / png).stat().st_size > 0
    assert json.loads((folder / "summary.json").read_text())["suites"] == summary["suites"]
    s = summary["suites"]
    # a 2-step byte model: far from perfect, far from broken
    assert 1.0 < s["perplexity"]["perplexity"] < 261 * 2
    assert len(s["diffusion"]["loss_per_t"]) == 2 and all(v > 0 for v in s["diffusion"]["loss_per_t"])
    assert 0.0 <= s["generation"]["overall"] <= 1.0 and 0.0 <= s["captioning"]["both"] <= 1.0
    moe = json.loads((folder / "moe.json").read_text())
    # debug_cpu_moe: 4 layers x 8 routed experts, top-2; every routed pick counted once
    assert sum(s["moe"]["class_totals"].values()) == 4 * 8
    for group, count in moe["counts"].items():
        assert np.asarray(count).sum(axis=1).tolist() == [2 * moe["tokens"][group]] * 4
    assert (folder / "moe_training_load.png").is_file()  # from the run's expert_load.jsonl
    assert len(moe["timestep_cv"]) == 4 and len(moe["understanding_generation_r_per_layer"]) == 4


def test_eval_heldout_folder_and_bad_inputs(initial_run, data_cache, tmp_path, capsys):
    from unimm.data_pipelines.encoders import EncoderSpec
    from unimm.data_pipelines.write_shards import write_procedural
    from unimm.tokenizer import Tokenizer

    held = tmp_path / "held"
    write_procedural(held, {"text": 6}, encoder=EncoderSpec("raw_pixels", image_size=32, patch=8),
                     tokenizer=Tokenizer.Config(), seed=5, progress=False)
    assert main(["eval", "--run", str(initial_run), "--suite", "perplexity", "--heldout-text", str(held), "--json"]) == 0
    report = json.loads((initial_run / "eval" / "step-2" / "perplexity.json").read_text())
    assert report["heldout"] == str(held) and report["documents"] == 6
    capsys.readouterr()

    cases = [
        (["--run", str(tmp_path / "nowhere")], "no such run folder"),
        (["--run", str(initial_run), "--ckpt", "step-99"], "no complete step-99; it has steps [2]"),
        (["--run", str(initial_run), "--suite", "perplexity,vibes"], "--suite vibes: unknown suite"),
        (["--run", str(initial_run), "--samples", "0"], "--samples 0: expected a positive number"),
        (["--run", str(initial_run), "--seed", "0", "--suite", "perplexity"], "--seed 0 is the run's training procedural_seed"),
        (["--run", str(initial_run), "--heldout-image", str(tmp_path)], "no manifest.json"),
        (["--run", str(initial_run), "--suite", "moe"], "--suite moe: the model has no routed experts"),
        (["--run", str(initial_run), "--recipe", "debug_cpu_moe", *small_run_options(data_cache)], "the checkpoint lacks"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _context(image_size=32, patch=8):
    encoder = RawPixels(image_size, patch)
    return heldout.DataContext(build_tokenizer(), encoder.encode, image_size, encoder.latent_dim, 256, 0, None)


def _model(flavor="debug"):
    torch.manual_seed(0)
    model = FLAVORS[flavor]().build()
    model.init_weights()
    return model.eval()


def test_heldout_losses_of_a_model_with_zero_heads():
    ctx, spec = _context(), heldout.HeldOutSpec(documents=5, timesteps=3, rows=2)
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform logits: cross-entropy log V at every target
        model.flow_head.weight.zero_()
        model.flow_head.bias.zero_()  # v-prediction 0: the loss is |z0 - eps|^2 at every t
    text = heldout.text_documents(spec, ctx)
    ppl = heldout.perplexity(model, text, ctx.tokenizer.pad_id, rows=2)
    assert ppl["nll"] == pytest.approx(math.log(261), rel=1e-5) and ppl["perplexity"] == pytest.approx(261, rel=1e-4)
    assert ppl["tokens"] == sum(len(d) - 1 for d in text)  # every position but the last predicts the next
    images = heldout.image_documents(spec, ctx)
    result = heldout.diffusion_loss(model, images, FlowMatchingConfig(), ctx.tokenizer.pad_id, timesteps=3, noise_seed=4, rows=2)
    assert result["t"] == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    # by hand: the same seeded noise per batch of 2 documents, one row each
    expected, count = 0.0, 0
    for b in range(3):
        docs = images[2 * b : 2 * b + 2]
        longest = max(len(d) for d in docs)
        eps = torch.randn((len(docs), longest, 192), generator=torch.Generator().manual_seed(4 * 1_000_003 + b))
        for row, doc in enumerate(docs):
            visual = np.flatnonzero(doc.denoise)
            expected += ((torch.from_numpy(doc.latents) - eps[row, visual]) ** 2).sum().item()
            count += doc.latents.size
    for loss in result["loss_per_t"]:
        assert loss == pytest.approx(expected / count, rel=1e-5)


def test_heldout_seed_must_not_be_training_seed():
    from unimm.errors import ConfigError

    with pytest.raises(ConfigError, match="held-out seed 0 is the training split's"):
        heldout.text_documents(heldout.HeldOutSpec(seed=0), _context())


def test_moe_capture_of_a_hand_set_router():
    model = _model("debug_moe")  # 4 layers, 8 routed experts, top-2, softmax router
    favourites = [(0, 1), (2, 7), (5, 3), (6, 4)]
    with torch.no_grad():
        for router, pair in zip(moe_capture.routers(model), favourites):
            router.gate.weight.zero_()  # equal scores: the expert bias alone decides the top 2
            router.expert_bias.zero_()
            router.expert_bias[list(pair)] = torch.tensor([2.0, 1.0])
    ctx, tk = _context(), build_tokenizer()
    text = heldout.text_documents(heldout.HeldOutSpec(documents=3), ctx)
    images = heldout.image_documents(heldout.HeldOutSpec(documents=2), ctx)
    groups = {"text": (text, None), "understanding": (images, 1.0), **{f"generation_t{b}": (images, (b + 0.5) / 10) for b in range(10)}}
    counts = moe_capture.capture(model, groups, tk.pad_id, rows=2)
    text_tokens = sum(int((d.modality == 0).sum()) for d in text)
    assert counts.tokens["text"] == text_tokens and counts.tokens["understanding"] == 2 * 16
    for layer, pair in enumerate(favourites):
        expected = np.zeros(8, dtype=int)
        expected[list(pair)] = text_tokens
        assert counts.counts["text"][layer].tolist() == expected.tolist()
        assert counts.counts["generation_t3"][layer].tolist() == (expected // text_tokens * 32).tolist()
    report, modality, cv, r = moe_capture.analyse(counts, top_k=2)
    # both picked experts serve text and image alike: S = 0 (multimodal); the other six are unused
    assert modality.counts["multimodal"].tolist() == [2] * 4 and modality.counts["unused"].tolist() == [6] * 4
    assert np.nanmax(np.abs(modality.specialization)) == 0.0
    assert np.nanmax(cv) == 0.0  # the same experts in every timestep bin
    assert r.tolist() == pytest.approx([1.0] * 4)  # understanding and generation route alike


def test_probe_on_separable_and_random_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=400)
    centres = rng.normal(size=(4, 16)) * 3
    separable = centres[y] + 0.3 * rng.normal(size=(400, 16))
    assert probe_accuracy(separable, y, 4)["accuracy"] == 1.0
    noise = rng.normal(size=(400, 16))
    result = probe_accuracy(noise, y, 4)
    assert abs(result["accuracy"] - 0.25) < 0.12 and result["train"] == 300 and result["test"] == 100


def test_understanding_answers_normalised():
    assert understanding.extract_answer("Step one. Answer: Northeast.") == "northeast"
    assert understanding.is_correct("... so it lands. answer:  the Red  Circle.", "red circle")
    assert not understanding.is_correct("Answer: the red circle. Answer: blue star", "red circle")  # the last one counts
    assert understanding.is_correct("7", "7") and not understanding.is_correct("17", "7")
    sample = probe_sets.counting(3, seed=1, image_size=32)
    row = understanding.score_response("counting", f"Answer: {int(sample.answer) + 2}", sample)
    assert row == {"correct": False, "abs_error": 2}
    text = probe_sets.text_rendering(0, seed=1, image_size=64)
    row = understanding.score_response("text_rendering", text.answer, text)
    assert row["correct"] and row["cer"] == 0.0 and row["wer"] == 0.0


def test_generation_and_captioning_scores_on_ground_truth():
    size, rows = 96, []
    for prompt in generation.prompts(4, seed=3, image_size=size):
        if prompt["category"] == "single":
            rng = np.random.default_rng(0)
            image = procedural.render(procedural.place(rng, [(prompt["colour"], prompt["shape"])], size), size)
        elif prompt["category"] == "position":
            image = None  # the prompt's own scene (probes.diagonal, same seed and index)
            for i in range(4):
                sample = probe_sets.diagonal(i, 3, size)
                if sample.caption == prompt["prompt"]:
                    image = sample.image
        else:
            rng = np.random.default_rng(1)
            image = procedural.render(procedural.place(rng, [("blue", "square")] * prompt["count"], size), size)
        rows.append({**prompt, **generation.score(prompt, image)})
    assert generation.category_scores(rows) == {"colour": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0, "overall": 1.0}
    half = [{"colour": True}, {"colour": False}, {"position": True}]
    assert generation.category_scores(half) == {"colour": 0.5, "shape": None, "count": None, "position": 1.0, "overall": 0.75}
    assert score_caption("an orange star\n", "orange", "star")["both"]
    verdict = score_caption("a circle, red? no: a blue square", "blue", "square")
    assert not verdict["colour"] and not verdict["shape"] and verdict["read"] == "red blue circle square"
    assert score_caption("a blue square", "red", "square") == {"colour": False, "shape": True, "both": False, "read": "blue square"}
    assert not any(score_caption("a reddish circle", "red", "circle")[k] for k in ("colour", "both"))  # whole words


def test_captioning_scenes_follow_the_runs_single_object_layout():
    from unimm.data_pipelines.procedural import single_object_sample
    from unimm.evaluation.captioning import run_layout, single_object_images

    assert run_layout({"single_object_centred": [], "text": []}) == "centred"
    assert run_layout({"image_text": [], "text": []}) == "anywhere"
    centred = single_object_images(8, seed=1, image_size=32, layout="centred")
    anywhere = single_object_images(8, seed=1, image_size=32)
    # a centred object covers the middle pixel and is large; the demo's training scenes alike
    for image, _, _ in centred:
        assert (image[16, 16] != image[0, 0]).any() and (image != image[0, 0]).any(-1).mean() > 0.15
    assert sum((image != image[0, 0]).any(-1).mean() for image, _, _ in anywhere) < sum(
        (image != image[0, 0]).any(-1).mean() for image, _, _ in centred)
    train = single_object_sample(0, seed=0, layout="centred")["objects"][0]
    assert abs(train.centre[0] - 16) <= 2 and abs(train.centre[1] - 16) <= 2
