"""`unimm convert to-hf` exports the run's tokenizer, and only the run's.

A run trained with a sentencepiece tokenizer (`unimm.data_pipelines.train_tokenizer`) on shards
that the text job wrote with it: a model-only DCP checkpoint of the run's model (the recipe's
model at `--model_size.vocab_size` 448, larger than the 400-piece vocabulary, as real runs pad
theirs) is exported in both formats, and AutoTokenizer must then give exactly unimm's training
ids. A tokenizer that is not the run's must be refused before anything is written.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import make_start, starting_weights
from unimm.cli import main
from unimm.convert.dcp_io import save_model_checkpoint
from unimm.convert.hf_tokenizer import export_tokenizer
from unimm.data_pipelines import procedural
from unimm.data_pipelines.text import text_job
from unimm.errors import ConfigError
from unimm.titan.launch import load_recipe
from unimm.tokenizer import Tokenizer, build_tokenizer

RECIPE = "debug_sweep"  # debug_cpu with --model_size.*: its vocabulary can fit a sentencepiece model
VOCAB = "448"

# What training tokenised, plus what a prompt may hold: special-token strings (text in
# training, never markers), whitespace runs, digits, many scripts, compatibility and
# decomposed characters, and characters the vocabulary only spells as bytes.
CORPUS = [
    *(procedural.text_sample(i, seed=5)["text"] for i in range(20)),
    "the red circle is above the blue square.",
    "",
    "   ",
    "  two  spaces,   three,    four  ",
    "tab\tseparated\tvalues\nand\nlines\r\nwith\n\n\nblank ones\t\n",
    "digits 0 7 42 365 2024 3.14159 1,000,000 -17 +3e-8 ١٢٣",
    "<bos>",
    "<bos> <eos> <pad> <boi> <eoi> <unk>",
    "a circle<boi><eoi>then text<eos>and more<pad><bos>",
    "</s> <s> <|endoftext|> [CLS] <0x41> <0xFF>",
    "Ünïcödé: déjà vu, naïve, Zürich, Ærøskøbing, ñandú, İstanbul",
    "日本語のテキスト、中文文本、한국어 텍스트, Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย",
    "emoji and rare characters: 😀 👍🏽 👨‍👩‍👧 ☃ ♥ 𝔘𝔫𝔦 𓀀",
    "compatibility: ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ ﬂ ½ ™ ① ～ ｶﾞｷﾞ",
    unicodedata.normalize("NFD", "decomposed: Tiếng Việt, café, 한국어, がぎ"),
    "invisible \u200b\ufeff\u00a0\u2003\u3000 and control \x00\x07 characters",
    "▁ the meta symbol ▁▁ inside text ▁",
    "x" * 120 + " " + "the " * 30,
]


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


@dataclass
class SentencePieceRun:
    tokenizer: Path
    shards: Path
    checkpoint: Path

    @property
    def options(self) -> list[str]:
        """The options `unimm train --recipe RECIPE` was given."""
        return [
            "--model_size.vocab_size", VOCAB, "--tokenizer.path", str(self.tokenizer), "--dataloader.shards", str(self.shards),
        ]


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, sentencepiece_model) -> SentencePieceRun:
    root = tmp_path_factory.mktemp("sp_run")
    documents = root / "documents.jsonl"
    documents.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS if t.strip()))
    tokenizer = Tokenizer.Config(path=str(sentencepiece_model))
    shards = text_job(root / "shards", "text", [documents], tokenizer=tokenizer, progress=False).parent
    run = SentencePieceRun(sentencepiece_model, shards, root / "checkpoint" / "step-0")
    model = load_recipe(RECIPE, run.options).model_spec.model
    assert model.vocab_size == int(VOCAB)
    save_model_checkpoint(starting_weights(model), run.checkpoint)
    return run


@pytest.fixture(scope="module")
def exports(sp_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp_exports")
    for fmt in ("unimm", "llama"):
        out = root / fmt
        options = ["--format", fmt, "--recipe", RECIPE, *sp_run.options]
        assert convert("to-hf", "--ckpt", sp_run.checkpoint, "--out", out, *options) == 0
    return {fmt: root / fmt for fmt in ("unimm", "llama")}


def assert_training_ids(folder: Path, native: Tokenizer) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in CORPUS:
        assert tokenizer(text).input_ids == native.encode(text, bos=True), text
    assert tokenizer(CORPUS).input_ids == [native.encode(text, bos=True) for text in CORPUS]  # batched
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(native.config, name)) for name in native.special_ids}
    assert ids == native.special_ids
    assert tokenizer.bos_token_id == native.bos_id and tokenizer.eos_token_id == native.eos_id
    assert tokenizer.pad_token_id == native.pad_id
    for text in CORPUS[:25]:
        ids = native.encode(text, bos=True)
        assert tokenizer.decode(ids, skip_special_tokens=True) == native.decode(ids)


@pytest.mark.parametrize("fmt", ["unimm", "llama"])
def test_sentencepiece_run_exports_its_tokenizer(exports, sp_run, fmt):
    native = build_tokenizer(str(sp_run.tokenizer))
    assert native.vocabulary.kind == "sentencepiece"
    assert native.special_ids == {"pad": 0, "bos": 2, "eos": 3, "boi": 4, "eoi": 5}
    assert_training_ids(exports[fmt], native)
    config = json.loads((exports[fmt] / "config.json").read_text())
    assert config["vocab_size"] == int(VOCAB)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)


def test_byte_export_keeps_special_strings_as_text(tmp_path):
    # the byte tokenizer of a recognised flavor (no recipe): "<boi>" in a prompt is text, as in training
    start = make_start(tmp_path, "debug")
    assert_training_ids(start.hf, build_tokenizer())


def test_a_conversion_that_would_change_ids_is_refused(tmp_path):
    import sentencepiece

    # sentencepiece options train_tokenizer does not use; transformers' converter does not
    # reproduce a unigram model's ids
    corpus = [procedural.text_sample(i, seed=0)["text"] for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "unigram"), model_type="unigram",
        vocab_size=300, pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", bos_piece="<bos>",
        eos_piece="<eos>", control_symbols=["<boi>", "<eoi>"], byte_fallback=True, minloglevel=2,
    )
    with pytest.raises(ConfigError, match="gives other ids than unimm for .* cannot be exported exactly"):
        export_tokenizer(Tokenizer.Config(path=str(tmp_path / "unigram.model")), 300, 512)


def refused(capsys, sp_run, tmp_path, *options) -> str:
    out = tmp_path / "new" / "hf"
    assert convert("to-hf", "--ckpt", sp_run.checkpoint, "--out", out, "--recipe", RECIPE, *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("unimm: error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert not (tmp_path / "new").exists()  # no output folder, no staging folder
    return err


def test_another_tokenizer_than_the_shards_is_refused(sp_run, tmp_path, capsys):
    manifest = sp_run.shards / "manifest.json"
    recorded = json.loads(manifest.read_text())["tokenizer"]
    # no --tokenizer.path: the byte tokenizer, which would fit the 448 ids
    err = refused(capsys, sp_run, tmp_path, "--model_size.vocab_size", VOCAB, "--dataloader.shards", sp_run.shards)
    assert str(manifest) in err and f"sentencepiece tokenizer {str(sp_run.tokenizer)!r} (400 ids" in err
    assert recorded["fingerprint"] in err and f"--tokenizer.path {sp_run.tokenizer}" in err
    assert "the bytes tokenizer (261 ids" in err and "fingerprint, vocab_size, special_ids differ" in err
    # the right file with other special pieces: other special ids
    err = refused(capsys, sp_run, tmp_path, *sp_run.options, "--tokenizer.boi", "<unk>")
    assert str(manifest) in err and "boi 4" in err and "boi 1" in err and "special_ids differ" in err


def test_a_tokenizer_nothing_vouches_for_is_refused(sp_run, tmp_path, capsys):
    # procedural data records no tokenizer: the bug this guards against wrote the 261-id byte
    # tokenizer into a 448-id model
    err = refused(capsys, sp_run, tmp_path, "--model_size.vocab_size", VOCAB)
    assert str(sp_run.checkpoint) in err and "448 token ids" in err
    assert "the byte tokenizer (no --tokenizer.path) has 261" in err
    assert "--dataloader.shards" in err
    err = refused(capsys, sp_run, tmp_path, "--model_size.vocab_size", VOCAB, "--tokenizer.path", sp_run.tokenizer)
    assert f"--tokenizer.path {str(sp_run.tokenizer)!r} has 400" in err
    # shards named, but not there to read
    err = refused(capsys, sp_run, tmp_path, *sp_run.options[:4], "--dataloader.shards", tmp_path / "moved")
    assert str(tmp_path / "moved" / "manifest.json") in err
