"""The tokenizer files of an exported folder: what AutoTokenizer loads, offline.

The exported tokenizer gives the ids unimm trained with: the same vocabulary, the five
special tokens at the same ids, and <bos> before each text, as every training document
starts. The byte vocabulary becomes a byte-level BPE without merges (one token per UTF-8
byte, id = byte value); a tokenizer.json vocabulary is carried over with the specials it lacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from unimm.errors import ConfigError
from unimm.tokenizer import SPECIAL_NAMES, Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def _vocabulary(config: Tokenizer.Config, kind: str) -> HFTokenizer:
    if kind == "bytes":
        return _byte_vocabulary()
    if kind == "huggingface":
        path = Path(config.path).expanduser()
        return HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    raise ConfigError(
        f"tokenizer.path {config.path!r}: a {kind} vocabulary has no Hugging Face export yet; "
        "train with a tokenizer.json vocabulary or the byte tokenizer to export"
    )


def export_tokenizer(config: Tokenizer.Config, vocab_size: int, max_length: int) -> ExportedTokenizer:
    """The tokenizer as transformers will load it, checked against unimm's own ids."""
    from transformers import PreTrainedTokenizerFast

    native = Tokenizer(config)
    if native.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"tokenizer {config.path or 'bytes'!r} has {native.get_vocab_size()} ids, the model only "
            f"{vocab_size}: pass the run's --recipe and --tokenizer.* options"
        )
    tokenizer = _vocabulary(config, native.vocabulary.kind)
    pieces = {name: getattr(config, name) for name in SPECIAL_NAMES}
    # unimm appends the specials a vocabulary lacks in SPECIAL_NAMES order; so does this.
    tokenizer.add_special_tokens([AddedToken(pieces[name], special=True, normalized=False) for name in SPECIAL_NAMES])
    ids = {name: tokenizer.token_to_id(piece) for name, piece in pieces.items()}
    if ids != native.special_ids:
        raise ConfigError(f"tokenizer {config.path!r}: special ids {ids} differ from unimm's {native.special_ids}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{pieces['bos']} $A", pair=f"{pieces['bos']} $A $B:1", special_tokens=[(pieces["bos"], ids["bos"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=pieces["bos"],
        eos_token=pieces["eos"],
        pad_token=pieces["pad"],
        additional_special_tokens=[pieces["boi"], pieces["eoi"]],
        model_max_length=max_length,
    )
    return ExportedTokenizer(wrapped, ids)
