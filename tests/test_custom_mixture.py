"""A mixture written by the data jobs trains with the shipped `mixture` recipe, as the README's
Data section shows: model fitted to the tokenizer and the manifest, default source weights,
long documents and finished runs reported before anything is launched."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import losses, run_unimm
from unimm.cli import main as unimm_main
from unimm.data.doc_lengths import document_length
from unimm.data.loader import MODALITY_SHARES, check_document_lengths
from unimm.data.sequences import LayoutSettings, build_document
from unimm.data.shards import SampleSpec, load_manifest, read_samples
from unimm.data_pipelines import procedural
from unimm.data_pipelines.encoders import EncoderSpec
from unimm.data_pipelines.mix import mix_manifests
from unimm.data_pipelines.text import text_job
from unimm.data_pipelines.write_shards import write_procedural
from unimm.errors import ConfigError
from unimm.titan import launch
from unimm.tokenizer import Tokenizer

ENCODER = EncoderSpec("raw_pixels", image_size=16, patch=4)  # 16 patches of 48 channels
TINY_MODEL = [
    "--model_size.dim", "32", "--model_size.n_layers", "2", "--model_size.n_heads", "2",
    "--model_size.n_kv_heads", "1", "--model_size.ffn_hidden_dim", "64",
]


@dataclasses.dataclass(frozen=True)
class Mixture:
    folder: Path
    tokenizer: Path

    def options(self, *extra: str) -> list[str]:
        """The README's `--dataloader.shards d --tokenizer.path tok.model`, plus ``extra``."""
        return ["--dataloader.shards", str(self.folder), "--tokenizer.path", str(self.tokenizer), *extra]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, sentencepiece_model) -> Mixture:
    """The README's steps at toy size: a text job over a JSONL corpus (documents of 1 to 4
    sentences), procedural image-text, video and text-only reasoning sets, then `mix`."""
    root = tmp_path_factory.mktemp("mixture")
    tokenizer = Tokenizer.Config(path=str(sentencepiece_model))
    corpus = root / "corpus.jsonl"
    docs = [" ".join(procedural.text_sample(7 * i + j, seed=3)["text"] for j in range(1 + i % 4)) for i in range(40)]
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    d = root / "d"
    text_job(d / "web", "web", [corpus], tokenizer=tokenizer, per_shard=16, progress=False)
    write_procedural(
        d / "proc", {"image_text": 24, "video": 8, "grid_text": 6},
        encoder=ENCODER, tokenizer=tokenizer, samples_per_shard=12, progress=False,
    )
    mix_manifests(d, [d / "web", d / "proc"])
    return Mixture(d, sentencepiece_model)


def _info(mixture: Mixture) -> dict:
    return json.loads((mixture.folder / "manifest.json").read_text())


def _longest(mixture: Mixture, source: str) -> int:
    return _info(mixture)["source_info"][source]["document_lengths"]["longest"]


def _recipe(mixture: Mixture, *extra: str):
    return launch.load_recipe("mixture", mixture.options("--dump_folder", "unused", *extra))


# ---------------------------------------------------------------- manifest statistics


def test_manifest_counts_the_loader_document_lengths(mixture):
    tok = Tokenizer(Tokenizer.Config(path=str(mixture.tokenizer)))
    manifest = load_manifest(mixture.folder, ENCODER.patch**2 * 3)
    spec = SampleSpec(manifest.tokens_per_frame, manifest.latent_dim, tok.get_vocab_size())
    rng = np.random.default_rng(0)
    for name, shards in manifest.sources.items():
        lengths = Counter()
        for sample in read_samples(shards, spec):
            frames = 0 if sample["latents"] is None else len(sample["latents"])
            expected = document_length(len(sample["tokens"]), frames, manifest.tokens_per_frame)
            for p_understanding in (0.0, 1.0):  # both directions of an image-text pair
                layout = LayoutSettings(p_understanding=p_understanding, cond_dropout=0.0)
                doc = build_document(sample, tok, rng, latent_dim=spec.latent_dim, layout=layout)
                assert len(doc) == expected, (name, sample["key"])
            lengths[expected] += 1
        stats = manifest.info["source_info"][name]["document_lengths"]
        assert {int(k): v for k, v in stats["counts"].items()} == dict(lengths), name
        assert stats["longest"] == max(lengths) and stats["longest_key"] and stats["longest_shard"].endswith(".tar")


def test_stats_from_before_the_lengths_leave_them_out(tmp_path, mixture, caplog):
    # A job folder whose shards were finished by older code: its stats lack document_lengths,
    # so the manifest a re-run writes has none, and the check skips the source.
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": procedural.text_sample(i, seed=5)["text"]}) for i in range(6)))
    tokenizer = Tokenizer.Config(path=str(mixture.tokenizer))
    path = text_job(tmp_path / "old", "old", [corpus], tokenizer=tokenizer, per_shard=3, progress=False)
    assert "document_lengths" in json.loads(path.read_text())["source_info"]["old"]
    stats = tmp_path / "old" / "old-000001.stats.json"
    stats.write_text(json.dumps({k: v for k, v in json.loads(stats.read_text()).items() if k != "document_lengths"}))
    text_job(tmp_path / "old", "old", [corpus], tokenizer=tokenizer, per_shard=3, progress=False)
    assert "document_lengths" not in json.loads(path.read_text())["source_info"]["old"]
    manifest = load_manifest(tmp_path / "old", 48)
    assert check_document_lengths(manifest, {"old": 1.0}, seq_len=4, max_bad_fraction=0.0) == []


# ---------------------------------------------------------------- model and weights from the data


def test_model_and_weights_come_from_the_tokenizer_and_the_manifest(mixture):
    config = _recipe(mixture, "--training.seq_len", "640", *TINY_MODEL)
    model = config.model_spec.model
    vocab = Tokenizer(Tokenizer.Config(path=str(mixture.tokenizer))).get_vocab_size()
    assert (model.vocab_size, model.latent_dim, model.max_seq_len, model.dim) == (vocab, 48, 640, 32)
    manifest = launch.preflight(config)
    assert (config.dataloader.vocab_size, config.dataloader.latent_dim) == (vocab, 48)

    # The paper's modality shares over the modalities present (no action: renormalised),
    # each split by the sources' tokens.
    info = manifest.info["source_info"]
    tokens = {n: v["tokens"]["text"] + v["tokens"]["vision"] for n, v in info.items()}
    present = MODALITY_SHARES["text"] + MODALITY_SHARES["video"] + MODALITY_SHARES["image_text"]
    text = tokens["web"] + tokens["grid_text"]
    expected = {
        "web": MODALITY_SHARES["text"] / present * tokens["web"] / text,
        "grid_text": MODALITY_SHARES["text"] / present * tokens["grid_text"] / text,
        "video": MODALITY_SHARES["video"] / present,
        "image_text": MODALITY_SHARES["image_text"] / present,
    }
    assert config.dataloader.weights(manifest) == pytest.approx(expected)
    # the whole mixture on the command line replaces the defaults
    chosen = _recipe(mixture, "--training.seq_len", "640", "--dataloader.source_weights", "web", "3", "video", "1")
    assert chosen.dataloader.weights(launch.preflight(chosen)) == {"web": 3.0, "video": 1.0}


def test_explicit_values_are_kept_unless_the_data_contradicts_them(mixture):
    vocab = Tokenizer(Tokenizer.Config(path=str(mixture.tokenizer))).get_vocab_size()
    config = _recipe(mixture, "--training.seq_len", "640", "--model_size.vocab_size", str(vocab + 100),
                     "--model_size.max_seq_len", "1024", "--model_size.latent_dim", "48")
    model = config.model_spec.model
    assert (model.vocab_size, model.latent_dim, model.max_seq_len) == (vocab + 100, 48, 1024)
    launch.preflight(config)

    manifest = str(mixture.folder / "manifest.json")
    cases = [
        (["--model_size.vocab_size", str(vocab - 1)],
         ["--model_size.vocab_size", f"{vocab} ids", str(mixture.tokenizer), manifest]),
        (["--model_size.latent_dim", "64"], ["--model_size.latent_dim=64", manifest, "48 wide", "raw_pixels"]),
        (["--model_size.max_seq_len", "320"], ["--model_size.max_seq_len=320", "--training.seq_len=640"]),
    ]
    for extra, fragments in cases:
        config = _recipe(mixture, "--training.seq_len", "640", *extra)  # parsing never fails (tyro)
        with pytest.raises(ConfigError) as err:
            launch.preflight(config)
        for fragment in fragments:
            assert fragment in str(err.value), (fragment, str(err.value))


# ---------------------------------------------------------------- long documents, before launch


def test_long_documents_are_reported_from_the_manifest(mixture, caplog):
    longest = _longest(mixture, "grid_text")  # every grid_text document is about 600 positions
    with pytest.raises(ConfigError) as err:
        launch.preflight(_recipe(mixture, "--training.seq_len", "256"))
    message = str(err.value)
    stats = _info(mixture)["source_info"]["grid_text"]["document_lengths"]
    for fragment in [
        "source 'grid_text'", "6 of its 6 samples (100.0%)", "--training.seq_len=256",
        f"longest {longest} positions", repr(stats["longest_key"]), stats["longest_shard"],
        f"raise --training.seq_len to at least {longest}", "--max-tokens 254", "dataloader.max_bad_fraction=0.01",
    ]:
        assert fragment in message, (fragment, message)

    # One web document of 40 is longer than 160: over the default 1% the run would stop, so
    # it is an error; under a 5% allowance the loader skips it, and a warning says so.
    web_longest = _longest(mixture, "web")
    seq_len = str(web_longest - 1)
    only_web = ["--training.seq_len", seq_len, "--dataloader.source_weights", "web", "1"]
    with pytest.raises(ConfigError, match=r"source 'web': 1 of its 40 samples \(2.5%\)"):
        launch.preflight(_recipe(mixture, *only_web))
    with caplog.at_level(logging.WARNING):
        launch.preflight(_recipe(mixture, *only_web, "--dataloader.max_bad_fraction", "0.05"))
    assert "source 'web': 1 of its 40 samples" in caplog.text and "the loader will skip them" in caplog.text


def test_unimm_train_stops_before_launch_with_one_message(tmp_path, mixture, capsys):
    for extra, fragment in [
        (["--training.seq_len", "256"], "unimm: error: documents longer than a row: source 'grid_text'"),
        (["--model_size.vocab_size", "10"], "unimm: error: --model_size.vocab_size=10 is smaller than the tokenizer"),
    ]:
        rc = unimm_main(["train", "--recipe", "mixture", "--out", str(tmp_path / "run"), *mixture.options(*extra)])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing was launched


# ---------------------------------------------------------------- the command line


def test_train_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit) as exit_:
        unimm_main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in launch.recipe_names():
        assert f"\n  {name} " in out, name
    assert "mixture" in launch.recipe_names()


def test_a_checkpoint_past_the_steps_is_reported_without_launching(tmp_path, mixture, capsys):
    # No torchrun: a complete checkpoint (DCP .metadata) at or past --training.steps ends it.
    (tmp_path / "checkpoint" / "step-7").mkdir(parents=True)
    (tmp_path / "checkpoint" / "step-7" / ".metadata").write_bytes(b"")
    (tmp_path / "checkpoint" / "step-9").mkdir()  # incomplete: ignored, as torchtitan does
    rc = launch.train("mixture", str(tmp_path), 5, 1, mixture.options())
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{tmp_path} is finished: its checkpoint step-7 is past --training.steps=5" in out
    assert "pass a larger --steps (e.g. --steps 10" in out
    config = launch.load_recipe("mixture", mixture.options("--dump_folder", str(tmp_path), "--training.steps", "8"))
    assert launch.finished_message(config) is None  # 8 > 7: resumes


@pytest.mark.slow
def test_readme_mixture_command_trains_and_then_reports_the_run_finished(tmp_path, mixture):
    out = tmp_path / "x"
    command = ["train", "--recipe", "mixture", "--out", str(out), *mixture.options(),
               "--steps", "2", "--training.seq_len", "640", "--training.local_batch_size", "2",
               "--metrics.log_freq", "1", *TINY_MODEL]
    result = run_unimm(*command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    vocab = Tokenizer(Tokenizer.Config(path=str(mixture.tokenizer))).get_vocab_size()
    assert f"vocab_size {vocab} (tokenizer {mixture.tokenizer})" in result.stdout
    assert "latent_dim 48" in result.stdout and "max_seq_len 640 (--training.seq_len)" in result.stdout
    assert "source weights from" in result.stdout
    assert sorted(losses(out)) == [1, 2] and (out / "checkpoint" / "step-2" / ".metadata").is_file()
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(last[f"data/documents/{name}"] > 0 for name in ("web", "grid_text", "image_text", "video"))

    again = run_unimm(*command)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "is finished: its checkpoint step-2 reaches --training.steps=2" in again.stdout
    assert "--steps 4" in again.stdout and "Training starts" not in again.stdout + again.stderr
    assert sorted(losses(out)) == [1, 2]
