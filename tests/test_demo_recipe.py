"""`make demo` (issue 15): its data step, the demo recipe and its measurement agree."""

import re
import sys
from pathlib import Path

from unimm.data_pipelines.encoders import EncoderSpec
import pytest

from unimm.data_pipelines.procedural import SHAPES, image_sample, single_object_sample
from unimm.data_pipelines.write_shards import SOURCES, RenderSettings, write_procedural
from unimm.evaluation.scorers import score_colour, score_shape
from unimm.titan.launch import load_recipe, preflight
from unimm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from demo_targets import DEMO_LAYOUT, caption_correct, named  # noqa: E402


def _makefile_data_step() -> tuple[str, dict[str, int], int, int]:
    """(folder, counts, image size, patch) of the Makefile's demo data rule."""
    text = (ROOT / "Makefile").read_text()
    folder = re.search(r"^DEMO_DATA := (\S+)$", text, re.M).group(1)
    rule = re.search(r"^\$\(DEMO_DATA\)/manifest\.json:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    counts = {name: int(n) for name, n in re.findall(r"--count (\w+)=(\d+)", rule)}
    size, patch = (int(re.search(rf"--{flag} (\d+)", rule).group(1)) for flag in ("image-size", "patch"))
    return folder, counts, size, patch


def test_single_object_samples_are_one_scorable_shape_named_by_their_caption():
    for i in range(12):
        s = single_object_sample(i, seed=0, image_size=32)
        (obj,) = s["objects"]
        assert s["caption"] == f"{'an' if obj.colour == 'orange' else 'a'} {obj.colour} {obj.shape}"
        assert score_colour(s["image"], obj.colour).correct
        assert named(s["caption"]) == ([obj.colour], [obj.shape])
    # a pure function of (seed, index): the held-out split (seed 1) is other scenes
    assert (single_object_sample(3, 0)["image"] == single_object_sample(3, 0)["image"]).all()
    assert single_object_sample(3, 0)["caption"] != single_object_sample(3, 1)["caption"]
    # at the demo's 32 px the template scorer reads the ground truth's shape
    shapes = [single_object_sample(i, 1, 32) for i in range(16)]
    assert sum(score_shape(s["image"], s["objects"][0].shape).correct for s in shapes) >= 15
    assert {s["objects"][0].shape for s in shapes} <= set(SHAPES)


def test_centred_layout_draws_one_large_shape_near_the_centre_scored_as_its_caption():
    for i in range(32):
        s = single_object_sample(i, seed=1, image_size=32, layout="centred")
        (obj,) = s["objects"]
        # radius 0.28-0.41 of the image (diameter 18-26 px of 32), centre within 2 px of the
        # image centre: the shape stays inside
        assert 0.28 * 32 <= obj.radius <= 0.41 * 32
        assert all(abs(c - 16) <= 2 for c in obj.centre)
        assert all(obj.radius <= c <= 32 - obj.radius for c in obj.centre)
        assert score_colour(s["image"], obj.colour).correct and score_shape(s["image"], obj.shape).correct
        # the same names as the default layout's scene i: only place and size differ
        assert s["caption"] == single_object_sample(i, seed=1, image_size=32)["caption"]
    # the default layout places the shape as image_sample does (radius 0.14-0.24 of the image)
    radii = [single_object_sample(i, 0, 32)["objects"][0].radius for i in range(32)]
    assert 0.14 * 32 * 0.8**2 <= min(radii) and max(radii) <= 0.24 * 32
    assert max(o.radius for i in range(8) for o in image_sample(i, 0, 32)["objects"]) <= 0.24 * 32
    with pytest.raises(ValueError, match="layout 'middle'"):
        single_object_sample(0, 0, layout="middle")


def test_caption_is_right_only_with_exactly_the_scenes_colour_and_shape():
    assert caption_correct("a red circle", "red", "circle")
    assert caption_correct(" an orange star\n", "orange", "star")
    assert not caption_correct("a red square", "red", "circle")
    assert not caption_correct("a blue circle", "red", "circle")
    assert not caption_correct("a red circle and a blue square", "red", "circle")  # a second object
    assert not caption_correct("a reddish circle", "red", "circle")  # whole words only
    assert not caption_correct("", "red", "circle")


def test_demo_recipe_accepts_the_makefiles_data(tmp_path):
    folder, counts, size, patch = _makefile_data_step()
    config = load_recipe("demo")
    assert Path(config.dataloader.shards) == Path(folder)  # the recipe reads what the Makefile writes
    assert set(counts) == set(config.dataloader.source_weights)
    write_procedural(
        tmp_path, {name: 4 for name in counts}, encoder=EncoderSpec("raw_pixels", image_size=size, patch=patch),
        tokenizer=Tokenizer.Config(), samples_per_shard=4, progress=False,
    )
    config = load_recipe("demo", ["--dataloader.shards", str(tmp_path)])
    manifest = preflight(config)  # latent width, tokenizer and seq_len checked against the model
    assert manifest.tokens_per_frame == (size // patch) ** 2
    assert manifest.latent_dim == config.model_spec.model.latent_dim == 3 * patch * patch
    assert config.dataloader.weights(manifest) == {"single_object_centred": 1.0}


def test_demo_targets_hold_out_scenes_drawn_like_the_makefiles_data():
    _, counts, size, _ = _makefile_data_step()
    (source,) = counts
    # tools/demo_targets.py's default held-out scenes (seed 1) are seed 0's training scenes' kind
    record = SOURCES[source].make(5, 1, RenderSettings(size))
    scene = single_object_sample(5, 1, size, DEMO_LAYOUT)
    assert record.meta["caption"] == scene["caption"]
    assert (record.frames[0] == scene["image"]).all()
