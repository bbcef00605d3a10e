"""The tokenizer files of an exported folder: what AutoTokenizer loads, offline.

The exported tokenizer gives the ids unimm trained with: the same vocabulary, the five
special tokens at the same ids, and <bos> before each text, as every training document
starts. The byte vocabulary becomes a byte-level BPE without merges (one token per UTF-8
byte, id = byte value); a tokenizer.json vocabulary is carried over with the specials it
lacked; a sentencepiece model (``train_tokenizer``'s) goes through transformers' own
converter, with one fix to its normalizer (`_nfkc_first`).

Training never reads a special token out of text: the pipelines place <bos>, <boi>, ... by
position, and the byte and sentencepiece vocabularies spell the string "<boi>" as ordinary
text. Their exports therefore set ``split_special_tokens``, so that a prompt holding "<boi>"
gets the same text ids. A tokenizer.json vocabulary reads its own added tokens out of text
in unimm too, so that export keeps transformers' default (which then also reads the specials
appended to that vocabulary, <boi> say, where unimm would not).

Every export is checked where it matters: the tokenizer as AutoTokenizer loads it must give
unimm's ids on `PROBE_TEXTS` (whitespace runs, digits, many scripts, compatibility and
decomposed characters, byte fallback, special-token strings), or the export is refused.
"""

from __future__ import annotations

import functools
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from unimm.errors import ConfigError
from unimm.tokenizer import SPECIAL_NAMES, Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Texts every export must encode exactly as unimm does (with <bos> first). Known upstream
# difference left out: combining marks right after a character NFKC expands ("™\u0301"), see
# `_nfkc_first`.
PROBE_TEXTS = (
    "A red square is to the left of a blue circle.",
    "",
    " ",
    "  leading, trailing   and inner    runs of spaces  ",
    "tabs\tand\nnewlines\r\n\n    indented\n\tmixed \t \n",
    "digits 0123456789 3.14159 -42 1,000,000 2024-06-01 x² 10⁻³ ½",
    "ünïcödé wörld ☃ 日本語のテキスト 中文 한국어 Ελληνικά русский العربية עברית हिन्दी ไทย",
    "rare characters fall back to bytes: 👍🏽 👨‍👩‍👧 🤖 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0010fffd",
    "compatibility forms: ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ ™ ① ～ 〜 ｶﾞｷﾞﾊﾟ ㍿ ㈱",
    unicodedata.normalize("NFD", "decomposed: Tiếng Việt rất đẹp, ça déjà vu, 한국어, がぎぐ"),
    "controls \x00\x07\x1b and invisibles \u200b\u200d\ufeff\u00a0\u2003\u3000 between",
    "▁ sentencepiece's meta symbol ▁▁ and lookalikes <0x41> <unk> <s> </s> <|endoftext|>",
    "private use \ue000\ue001\ue002 characters",
    "The Quick BROWN fox; punctuation!? (brackets) [x] {y} \"quotes\" 'single' `back` ...",
    "long " + "a" * 200 + " " + "the " * 50,
)


@dataclass(frozen=True)
class ExportedTokenizer:
    tokenizer: PreTrainedTokenizerBase
    """save_pretrained() writes tokenizer.json and tokenizer_config.json."""
    special_ids: dict[str, int]


def _byte_level_symbols() -> dict[int, str]:
    """The printable character byte-level pre-tokenizers emit for each byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in symbols):
        symbols[byte] = chr(256 + offset)
    return symbols


def _byte_vocabulary() -> HFTokenizer:
    vocab = {symbol: byte for byte, symbol in _byte_level_symbols().items()}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


# sentencepiece_model.proto, TrainerSpec.ModelType and NormalizerSpec.name
_SPM_UNIGRAM, _SPM_BPE = 1, 2
_NFKC_RULES = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")
# Private-use characters (NFKC leaves them alone) carry `_nfkc_first`'s exceptions past NFKC:
# _ESCAPE + _LITERAL stands for a literal _ESCAPE in the text, _ESCAPE + _MARKS[i] for exception i.
_ESCAPE, _LITERAL, _MARKS = "\ue000", "\ue001", 0xE002
_MAX_EXCEPTIONS = 256


@functools.cache
def _nfkc_changes() -> tuple[str, ...]:
    """Every character tokenizers' NFKC changes (one pass: NFKC composes nothing across "\\n")."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and c != ord("\n")]
    normalized = normalizers.NFKC().normalize_str("\n".join(chars)).split("\n")
    return tuple(c for c, n in zip(chars, normalized, strict=True) if c != n)


@functools.lru_cache(maxsize=4)
def _nfkc_exceptions(library_json: str) -> tuple[str, ...]:
    library = HFTokenizer.from_str(library_json).normalizer
    nfkc_then = normalizers.Sequence([normalizers.NFKC(), library])
    return tuple(c for c in _nfkc_changes() if nfkc_then.normalize_str(c) != library.normalize_str(c))


def _nfkc_first(tokenizer: HFTokenizer) -> None:
    """Put NFKC in front of the normalizer transformers built from an NFKC-based sentencepiece model.

    That normalizer applies the model's character map with tokenizers' ``Precompiled``, which
    works a grapheme at a time and keeps only the shortest rule matching its start
    (huggingface/tokenizers#2116): combining marks after a mapped character are dropped or left
    uncomposed where sentencepiece composes them (decomposed text, half-width kana with voiced
    marks). The map is NFKC plus a few exceptions, so after NFKC it has almost nothing left to
    do. The characters where NFKC and the map disagree (e.g. U+FF5E, which the map keeps) are
    found by trying every character NFKC changes, and carried past NFKC as private-use pairs.
    What still differs (rarely): combining marks after a character NFKC expands ("™" + U+0301)
    or in non-canonical order, which NFKC composes and sentencepiece's map does not.
    """
    library = tokenizer.normalizer
    bare = HFTokenizer(models.BPE())
    bare.normalizer = library
    exceptions = _nfkc_exceptions(bare.to_str())
    if len(exceptions) > _MAX_EXCEPTIONS:  # not an NFKC map after all: leave it as converted
        return
    marks = {c: _ESCAPE + chr(_MARKS + i) for i, c in enumerate(exceptions)}
    escape = [normalizers.Replace(_ESCAPE, _ESCAPE + _LITERAL), *(normalizers.Replace(c, m) for c, m in marks.items())]
    unescape = [*(normalizers.Replace(m, c) for c, m in marks.items()), normalizers.Replace(_ESCAPE + _LITERAL, _ESCAPE)]
    steps = [*escape, normalizers.NFKC(), *unescape] if exceptions else [normalizers.NFKC()]
    tokenizer.normalizer = normalizers.Sequence([*steps, library])


def _sentencepiece_vocabulary(path: Path) -> HFTokenizer:
    """transformers' conversion of a sentencepiece model (the one AutoTokenizer applies to a
    tokenizer.model without a model-specific class): BPE merges ranked by piece score, byte
    fallback, and the model's own normalizer spec; control pieces (<bos>, <boi>, ...) never
    come out of text."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    model_type = proto.trainer_spec.model_type
    if model_type == _SPM_BPE:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    elif model_type == _SPM_UNIGRAM:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:
        raise ConfigError(
            f"tokenizer.path {str(path)!r}: a sentencepiece model of type {model_type} (word or char) "
            "has no Hugging Face conversion"
        )
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
    if proto.normalizer_spec.precompiled_charsmap and proto.normalizer_spec.name in _NFKC_RULES:
        _nfkc_first(tokenizer)
    return tokenizer


def _vocabulary_file(config: Tokenizer.Config, name: str) -> Path:
    path = Path(config.path).expanduser()  # load_vocabulary's rule: a folder holds tokenizer.json or tokenizer.model
    return path / name if path.is_dir() else path


def _vocabulary(config: Tokenizer.Config, kind: str) -> HFTokenizer:
    if kind == "bytes":
        return _byte_vocabulary()
    if kind == "huggingface":
        return HFTokenizer.from_file(str(_vocabulary_file(config, "tokenizer.json")))
    if kind == "sentencepiece":
        return _sentencepiece_vocabulary(_vocabulary_file(config, "tokenizer.model"))
    raise ConfigError(f"tokenizer.path {config.path!r}: a {kind} vocabulary has no Hugging Face export")


def probe_texts(config: Tokenizer.Config) -> list[str]:
    """`PROBE_TEXTS` and texts holding the special-token strings of ``config``."""
    pieces = [getattr(config, name) for name in SPECIAL_NAMES]
    glued = "glued" + "word".join(pieces) + "end"
    return [*PROBE_TEXTS, " ".join(pieces), glued, f"{pieces[1]}starts and ends{pieces[2]}"]


def check_ids(tokenizer: PreTrainedTokenizerBase, native: Tokenizer, texts: list[str]) -> None:
    """``tokenizer(text)`` must be unimm's ``encode(text, bos=True)`` for every text."""
    for text in texts:
        got, expected = tokenizer(text).input_ids, native.encode(text, bos=True)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ConfigError(
                f"tokenizer {native.config.path or 'bytes'!r} ({native.vocabulary.kind}): its Hugging Face "
                f"conversion gives other ids than unimm for {text!r}: from position {first}, "
                f"{got[first:first + 8]} instead of {expected[first:first + 8]}; this vocabulary cannot be "
                "exported exactly"
            )


def export_tokenizer(config: Tokenizer.Config, vocab_size: int, max_length: int) -> ExportedTokenizer:
    """The tokenizer as transformers will load it, checked against unimm's own ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    native = Tokenizer(config)
    if native.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"tokenizer {config.path or 'bytes'!r} has {native.get_vocab_size()} ids, the model only "
            f"{vocab_size}: pass the run's --recipe and --tokenizer.* options"
        )
    kind = native.vocabulary.kind
    tokenizer = _vocabulary(config, kind)
    pieces = {name: getattr(config, name) for name in SPECIAL_NAMES}
    # unimm appends the specials a vocabulary lacks in SPECIAL_NAMES order; so does this.
    tokenizer.add_special_tokens([AddedToken(pieces[name], special=True, normalized=False) for name in SPECIAL_NAMES])
    ids = {name: tokenizer.token_to_id(piece) for name, piece in pieces.items()}
    if ids != native.special_ids:
        raise ConfigError(f"tokenizer {config.path!r}: special ids {ids} differ from unimm's {native.special_ids}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{pieces['bos']} $A", pair=f"{pieces['bos']} $A $B:1", special_tokens=[(pieces["bos"], ids["bos"])]
    )
    # Special-token strings are text in training (module docs), except a tokenizer.json's own.
    split_special_tokens = kind != "huggingface"
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=pieces["bos"],
        eos_token=pieces["eos"],
        pad_token=pieces["pad"],
        additional_special_tokens=[pieces["boi"], pieces["eoi"]],
        model_max_length=max_length,
        split_special_tokens=split_special_tokens,
    )
    with tempfile.TemporaryDirectory(prefix="unimm-tokenizer-") as folder:
        wrapped.save_pretrained(folder)
        loaded = AutoTokenizer.from_pretrained(folder)
    check_ids(loaded, native, probe_texts(config) if split_special_tokens else list(PROBE_TEXTS))
    return ExportedTokenizer(wrapped, ids)
