"""What a person meets at the command line: re-running a failed data job with corrected
settings, a wrong encoder folder, which shards `unimm sample` captions, and the help texts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unimm.data_pipelines import image_text
from unimm.data_pipelines.shard_job import Job, Record, ShardTask, cli, run_job
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

BYTES = Tokenizer.Config()


# ------------------------------------------------------- 1. the settings lock of a job folder


def _producer(item):
    if item == "bad":
        raise RuntimeError("input broke the job")
    yield Record(f"doc-{item}", {"text": item}, f"text {item}")


def _job(**settings) -> Job:
    return Job(source="web", kind="text", producer=_producer, tokenizer=BYTES, settings=settings)


def test_job_that_finished_no_shard_takes_corrected_settings(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="input broke"):
        run_job(out, _job(field="wrong"), [ShardTask(0, ("bad",))], progress=False)
    assert (out / "job.json").is_file() and not list(out.glob("*.stats.json"))
    (out / "web-000003.tar").write_bytes(b"a shard renamed by a killed run before its stats file")

    manifest = run_job(out, _job(field="right"), [ShardTask(0, ("a",)), ShardTask(1, ("b",))], progress=False)

    info = json.loads(manifest.read_text())
    assert info["sources"]["web"] == ["web-000000.tar", "web-000001.tar"]
    assert json.loads((out / "job.json").read_text())["settings"] == {"field": "right"}
    assert not (out / "web-000003.tar").exists(), "the old run's unfinished shard is dropped"


def test_job_with_a_finished_shard_refuses_other_settings(tmp_path):
    out = tmp_path / "out"
    tasks = [ShardTask(0, ("a",)), ShardTask(1, ("bad",))]
    with pytest.raises(RuntimeError):
        run_job(out, _job(field="text"), tasks, progress=False)
    assert (out / "web-000000.stats.json").is_file()

    with pytest.raises(ConfigError) as refused:
        run_job(out, _job(field="caption"), tasks, progress=False)
    message = str(refused.value)
    assert str(out) in message and "\n" not in message
    assert 'settings.field: "text" -> "caption"' in message
    assert "new --out folder" in message and f"delete {out}" in message
    assert json.loads((out / "job.json").read_text())["settings"] == {"field": "text"}, "the folder is untouched"


# ------------------------------------------------------- 2. a wrong encoder weights folder


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a grey square")
    return folder


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("layout", ["missing", "empty", "config_only", "file"])
def test_wrong_encoder_path_is_one_line_and_exit_2(tmp_path, capsys, layout):
    weights = tmp_path / "weights"
    if layout == "empty":
        weights.mkdir()
    elif layout == "config_only":
        weights.mkdir()
        (weights / "config.json").write_text("{}")
    elif layout == "file":
        weights.write_text("not a folder")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--source", "cc", "--encoder", "siglip2", "--encoder-path", str(weights),
            str(_images(tmp_path / "imgs"))]

    assert cli(image_text.main, argv) == 2

    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: encoder 'siglip2'") and str(weights) in lines[0]
    assert "config.json" in lines[0] and "model.safetensors" in lines[0] and "save_pretrained" in lines[0]
    assert not out.exists(), "nothing is written for a wrong --encoder-path"


def test_encoder_folder_that_fails_to_load_is_one_line_then_a_corrected_rerun_works(tmp_path, capsys):
    # A folder with the right file names whose contents transformers cannot read: the check
    # by names passes, loading fails after job.json was written.
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"not safetensors")
    images, out = _images(tmp_path / "imgs"), tmp_path / "out"
    common = ["--out", str(out), "--source", "cc", str(images)]

    assert cli(image_text.main, [*common, "--encoder", "siglip2", "--encoder-path", str(weights)]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "error: encoder 'siglip2'" in lines[0] and str(weights) in lines[0], lines

    assert cli(image_text.main, [*common, "--encoder", "raw_pixels", "--image-size", "28"]) == 0
    assert json.loads((out / "manifest.json").read_text())["source_info"]["cc"]["samples"] == 2


def test_encoder_that_fails_to_load_in_a_worker_process_ends_the_job(tmp_path):
    """A pool worker whose initializer raised was restarted forever (the job hung); now the
    error comes back with its first task. (End to end with --workers 2 this is a 10 s run.)"""
    from unimm.data_pipelines import shard_job
    from unimm.data_pipelines.encoders import EncoderSpec

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"not safetensors")
    job = Job(source="cc", kind="image_text", producer=_producer, tokenizer=BYTES, directions=("i2t",),
              encoder=EncoderSpec("siglip2", str(weights)))
    import torch

    threads = torch.get_num_threads()
    try:
        shard_job._init_worker(job, tmp_path, threads)  # must not raise: the pool would start another worker
        with pytest.raises(ConfigError, match=f"cannot load --encoder-path {weights}"):
            shard_job._run_task(ShardTask(0, ("a",)))
    finally:
        shard_job._WORKER = shard_job._WORKER_ERROR = None
        torch.set_num_threads(threads)


# ------------------------------------------------------- 3. which sources `unimm sample` captions


def test_sample_captions_sources_by_their_kind_and_direction_not_their_name():
    from unimm.sampling_cli import captioning_sources

    manifest = {
        "sources": {"web": ["w.tar"], "sstk": ["s.tar"], "metaclip": ["m.tar"], "clips": ["c.tar"],
                    "grid_understanding": ["g.tar"], "legacy_pairs": ["l.tar"]},
        "source_info": {
            "web": {"kind": "text", "directions": []},
            "sstk": {"kind": "image_text", "directions": ["t2i"]},
            "metaclip": {"kind": "image_text", "directions": ["i2t"]},
            "clips": {"kind": "video", "directions": []},
            "grid_understanding": {"kind": "image_text", "directions": ["i2t"]},
            "legacy_pairs": {"kind": "image_text"},  # no directions recorded: both, as the loader reads it
        },
    }
    assert captioning_sources(manifest) == ["metaclip", "grid_understanding", "legacy_pairs"]
    # Generation-only image-text data is still captioned when there is nothing else.
    only_t2i = {"sources": {"sstk": [], "web": []},
                "source_info": {"sstk": {"kind": "image_text", "directions": ["t2i"]}, "web": {"kind": "text"}}}
    assert captioning_sources(only_t2i) == ["sstk"]
    assert captioning_sources({"sources": {"web": []}, "source_info": {"web": {"kind": "text"}}}) == []


def test_sample_takes_images_from_every_chosen_source_in_turn():
    from unimm.sampling_cli import _round_robin

    assert list(_round_robin([iter("ab"), iter("xyz"), iter("")])) == ["a", "x", "b", "y", "z"]


# ------------------------------------------------------- 4. help texts


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from unimm.cli import build_parser

    def children(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return {}

    top = build_parser()
    verbs = children(top)
    convert = verbs["convert"]
    return {
        "unimm": top,
        "unimm sample": verbs["sample"],
        "unimm params": verbs["params"],
        "unimm convert": convert,
        **{f"unimm convert {name}": p for name, p in children(convert).items()},
    }


def test_every_sample_and_convert_option_has_help():
    parsers = _parsers()
    for name in ("unimm sample", "unimm params", "unimm convert to-hf", "unimm convert from-hf"):
        for action in parsers[name]._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings}: no help"


def test_help_is_plain_prose():
    for name, parser in _parsers().items():
        text = parser.format_help()
        assert "`" not in text and "**" not in text and ":mod:" not in text, f"{name} --help:\n{text}"
    # Lines laid out by hand stay as written.
    assert "\n  unimm train --recipe debug_cpu" in _parsers()["unimm"].format_help()
