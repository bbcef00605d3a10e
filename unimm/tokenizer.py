"""The tokenizer: one interface over three vocabularies, chosen by `Tokenizer.Config.path`.

- ``""`` (default): UTF-8 bytes, ids 0..255. Needs no file, so procedural data, the demo and
  the tests work on a fresh machine.
- a sentencepiece ``.model`` file (``python -m unimm.data_pipelines.train_tokenizer`` writes one).
- a Hugging Face ``tokenizer.json``, or a folder holding one (e.g. Llama 3's).

The model needs five special ids: pad, bos, eos, boi, eoi. Each is looked up by the piece
string in the config; a piece the vocabulary lacks gets a new id after it, so an existing
vocabulary gains ``<boi>``/``<eoi>`` without retraining (`get_vocab_size` counts them). The
byte vocabulary has no pieces, so its specials are 256..260 in the order pad, bos, eos, boi, eoi.

Shards store token ids, so `fingerprint` names the vocabulary file and the special ids; the
loader refuses shards tokenised with a different one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torchtitan.components.tokenizer import BaseTokenizer

from unimm.errors import ConfigError

SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi")


class Vocabulary(Protocol):
    """What a tokenizer file provides; the special ids are resolved on top of it."""

    kind: str
    size: int  # ids 0..size-1
    digest: str  # of the file's bytes: two files with the same name can differ

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def piece_id(self, piece: str) -> int | None: ...


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ByteVocabulary:
    kind, size, digest = "bytes", 256, "utf-8"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def piece_id(self, piece: str) -> int | None:
        return None


class SentencePieceVocabulary:
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.size, self.digest = self._sp.get_piece_size(), _digest(path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # control pieces (<bos>, <boi>, ...) decode to nothing

    def piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk for an unknown piece; only a real match counts.
        return i if self._sp.id_to_piece(i) == piece else None


class HuggingFaceVocabulary:
    kind = "huggingface"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self.size, self.digest = self._tok.get_vocab_size(with_added_tokens=True), _digest(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


def load_vocabulary(path: str) -> Vocabulary:
    if not path:
        return ByteVocabulary()
    p = Path(path).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    elif p.is_dir() and (p / "tokenizer.model").is_file():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise ConfigError(f"tokenizer.path {path!r}: no such file (a sentencepiece .model or a tokenizer.json)")
    if p.suffix == ".json":
        return HuggingFaceVocabulary(p)
    return SentencePieceVocabulary(p)


class Tokenizer(BaseTokenizer):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        path: str = ""
        """sentencepiece .model, tokenizer.json or a folder with one; empty: UTF-8 bytes."""

        pad: str = "<pad>"
        bos: str = "<bos>"
        eos: str = "<eos>"
        boi: str = "<boi>"
        eoi: str = "<eoi>"
        """Piece strings of the special tokens (e.g. --tokenizer.bos '<|begin_of_text|>')."""

    def __init__(self, config: Config | None = None, **_torchtitan_kwargs) -> None:
        # torchtitan passes tokenizer_path=hf_assets_path; the vocabulary is chosen by
        # config.path alone so that the checkpoint-assets folder cannot switch it silently.
        super().__init__()
        self.config = config or Tokenizer.Config()
        self.vocabulary = load_vocabulary(self.config.path)
        size = self.vocabulary.size
        ids: dict[str, int] = {}
        for name in SPECIAL_NAMES:
            piece = getattr(self.config, name)
            found = self.vocabulary.piece_id(piece)
            if found is None:
                found, size = size, size + 1
            ids[name] = found
        if len(set(ids.values())) != len(ids):
            raise ConfigError(f"tokenizer {self.config.path!r}: special tokens share ids {ids}")
        self.special_ids = ids
        self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id = (ids[n] for n in SPECIAL_NAMES)
        self._size = size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.vocabulary.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        special = set(self.special_ids.values())
        return self.vocabulary.decode([int(i) for i in ids if i not in special and i < self.vocabulary.size])

    def get_vocab_size(self) -> int:
        return self._size

    @property
    def fingerprint(self) -> str:
        """Identifies the ids this tokenizer produces (vocabulary file and special ids)."""
        key = json.dumps([self.vocabulary.kind, self.vocabulary.digest, self.special_ids], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What a manifest records about the tokenizer its shards were written with."""
        return {
            "kind": self.vocabulary.kind,
            "path": self.config.path,
            "fingerprint": self.fingerprint,
            "vocab_size": self.get_vocab_size(),
            "special_ids": dict(self.special_ids),
        }


def build_tokenizer(path: str = "", **pieces: str) -> Tokenizer:
    """The tokenizer outside torchtitan's config system (tools, conversion, tests)."""
    return Tokenizer(Tokenizer.Config(path=path, **pieces))
