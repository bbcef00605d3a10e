"""Text corpora -> tokenised shards (kind "text").

    python -m unimm.data_pipelines.text --out shards/dclm --source dclm --tokenizer tok.model \\
        --field text --max-tokens 4094 --workers 8 corpus/ extra.parquet book.txt

Inputs (files, or folders searched for them): .jsonl / .jsonl.gz (one JSON object per line,
the document in --field), .parquet (column --field), .txt (the whole file is one document).
Each shard holds up to --per-shard consecutive documents of one file. Documents longer than
--max-tokens are cut into consecutive pieces, so none is lost to the loader's rule that a
document must fit one row (seq_len minus <bos> and <eos>).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

from unimm.data_pipelines.records import SUFFIXES, expand_inputs, read_records, record_tasks
from unimm.data_pipelines.shard_job import Job, Record, ShardTask, Skip, add_job_arguments, cli, run_job
from unimm.tokenizer import Tokenizer


def documents(item: tuple[str, int, int], field: str) -> Iterator[Record | Skip]:
    path, start, stop = item
    stem = Path(path).name
    for index, record, reason in read_records(Path(path), start, stop):
        key = f"{stem}-{index:09d}"
        text = None if record is None else record.get(field)
        if record is None:
            yield Skip(key, reason)
        elif not isinstance(text, str):
            yield Skip(key, f"no string field {field!r}")
        else:
            yield Record(key, {"file": path, "index": index}, text)


def text_job(
    out: Path,
    source: str,
    inputs: list[Path],
    *,
    tokenizer: Tokenizer.Config,
    field: str = "text",
    max_tokens: int = 0,
    per_shard: int = 10_000,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    files = expand_inputs(inputs, SUFFIXES)
    tasks = [ShardTask(i, (r,)) for i, r in enumerate(record_tasks(files, per_shard))]
    job = Job(
        source=source,
        kind="text",
        producer=functools.partial(documents, field=field),
        tokenizer=tokenizer,
        max_text_tokens=max_tokens,
        settings={"inputs": [str(f) for f in files], "field": field, "per_shard": per_shard},
    )
    return run_job(out, job, tasks, workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, per_shard=10_000)
    parser.add_argument("--field", default="text", help="JSON key / Parquet column of the document")
    parser.add_argument("--max-tokens", type=int, default=0, help="cut longer documents into pieces (0: never)")
    parser.add_argument("inputs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    manifest = text_job(
        args.out,
        args.source,
        args.inputs,
        tokenizer=Tokenizer.Config(path=args.tokenizer),
        field=args.field,
        max_tokens=args.max_tokens,
        per_shard=args.per_shard,
        workers=args.workers,
    )
    print(f"wrote {manifest}")


if __name__ == "__main__":
    sys.exit(cli(main))
