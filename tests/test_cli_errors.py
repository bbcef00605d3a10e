"""Mistakes on the command line end with one clear line, not a stack trace."""

from conftest import run_unimm, small_run_options
from unimm.data_pipelines.write_shards import ensure_procedural_shards


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_recipe(tmp_path):
    result = run_unimm("train", "--recipe", "no_such_recipe", "--out", str(tmp_path))
    assert_clean_error(result, "unknown recipe 'no_such_recipe'", "debug_cpu")


def test_latent_width_of_shards_differs_from_model(tmp_path, data_cache):
    shards = ensure_procedural_shards(tmp_path, num_images=8, num_videos=2, num_texts=8, patch=4)
    result = run_unimm(
        "train", "--recipe", "debug_cpu", "--out", str(tmp_path / "run"),
        *small_run_options(data_cache), "--dataloader.shards", str(shards),
    )
    assert_clean_error(result, str(shards / "manifest.json"), "latent_dim is 48", "expects 192")


def test_sequence_longer_than_the_model_holds(tmp_path, data_cache):
    result = run_unimm(
        "train", "--recipe", "debug_cpu", "--out", str(tmp_path), *small_run_options(data_cache),
        "--training.seq_len", "4096",
    )
    assert_clean_error(result, "training.seq_len=4096", "max_seq_len=512")


def test_paper_recipe_without_shards(tmp_path):
    result = run_unimm("train", "--recipe", "dense_1b5", "--out", str(tmp_path))
    assert_clean_error(result, "--dataloader.shards")


def test_params_json_output():
    import json

    counts = json.loads(run_unimm("params", "--recipe", "modality_ffn_2b3", "--json").stdout)
    assert {"total_params", "active_params", "adapter_params"} <= set(counts)
    assert counts["total_params"] > counts["active_params"] > 0
