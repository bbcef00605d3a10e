"""Byte-level tokenizer with the special tokens the model needs.

Needs no training and no download, so the procedural data, the demo and the tests work on a
fresh machine. Ids 0..255 are UTF-8 bytes; the specials follow. Larger vocabularies
(sentencepiece, Hugging Face `tokenizer.json`) plug in through the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.components.tokenizer import BaseTokenizer

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")


class ByteTokenizer(BaseTokenizer):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, **_unused):
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id = (
            256 + i for i in range(len(SPECIAL_TOKENS))
        )

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)
