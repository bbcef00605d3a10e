"""Train a sentencepiece BPE tokenizer with the special tokens the model needs.

    python -m unimm.data_pipelines.train_tokenizer --out tok.model --vocab-size 32000 \\
        --workers 8 --max-documents 2000000 corpus/ extra.parquet

Reads the same inputs as the text job (.jsonl[.gz], .parquet, .txt; --field). Ids: 0 <pad>,
1 <unk>, 2 <bos>, 3 <eos>, 4 <boi>, 5 <eoi>. <boi>/<eoi> are control symbols, so the
literal string "<boi>" in a document is ordinary text and never becomes an image marker.
byte_fallback spells any character outside the learnt pieces as UTF-8 bytes, so nothing maps
to <unk>. Load the result with ``--tokenizer.path tok.model``.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from unimm.data_pipelines.records import SUFFIXES, expand_inputs, read_records
from unimm.data_pipelines.shard_job import cli, write_atomic
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer


def _documents(files: list[Path], field: str, limit: int) -> Iterator[str]:
    bar = tqdm(total=limit or None, desc="reading documents", unit="doc")
    n = 0
    for path in files:
        for _, record, _ in read_records(path):
            text = None if record is None else record.get(field)
            if isinstance(text, str) and text:
                yield text
                n += 1
                bar.update()
                if n == limit:
                    bar.close()
                    return
    bar.close()


def train_tokenizer(
    out: Path,
    inputs: list[Path],
    *,
    vocab_size: int,
    field: str = "text",
    max_documents: int = 0,
    workers: int = 1,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    import sentencepiece

    files = expand_inputs(inputs, SUFFIXES)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_documents(files, field, max_documents),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<bos>",
            eos_piece="<eos>",
            control_symbols=["<boi>", "<eoi>"],
            byte_fallback=True,
            character_coverage=character_coverage,
            num_threads=workers,
            max_sentence_length=1 << 20,  # documents, not sentences: keep long ones
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. a vocabulary larger than the corpus supports
        raise ConfigError(f"sentencepiece training failed: {exc}") from exc
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, model.getvalue())
    return Tokenizer(Tokenizer.Config(path=str(out)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the .model file to write")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--field", default="text")
    parser.add_argument("--max-documents", type=int, default=0, help="0: every document")
    parser.add_argument("--workers", type=int, default=1, help="sentencepiece training threads")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("inputs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    tok = train_tokenizer(
        args.out,
        args.inputs,
        vocab_size=args.vocab_size,
        field=args.field,
        max_documents=args.max_documents,
        workers=args.workers,
        character_coverage=args.character_coverage,
    )
    print(f"wrote {args.out}: vocabulary {tok.get_vocab_size()}, special ids {tok.special_ids}")


if __name__ == "__main__":
    sys.exit(cli(main))
