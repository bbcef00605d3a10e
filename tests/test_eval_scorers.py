"""Pixel scorers on images drawn by the project's own procedural renderer, with known answers."""

import pytest

from unimm.data_pipelines import probes, procedural
from unimm.data_pipelines.procedural import SceneObject, render
from unimm.evaluation import scorers as S

SIZE = 64


def test_red_square_is_red_and_square():
    img = render([SceneObject("red", "square", (30.0, 34.0), 14.0)], SIZE)
    c = S.score_colour(img, "red")
    assert c.predicted == "red" and c.correct
    assert not S.score_colour(img, "pink").correct
    s = S.score_shape(img, "square")
    assert s.predicted == "square" and s.correct
    assert s.ious["square"] > s.ious["diamond"]


@pytest.mark.parametrize("shape", ["circle", "triangle", "star", "diamond", "hexagon"])
def test_shapes_from_project_drawing(shape):
    img = render([SceneObject("blue", shape, (32.0, 32.0), 18.0)], SIZE)
    assert S.score_shape(img, shape).correct


def test_empty_image():
    img = procedural.blank(SIZE)
    assert S.score_colour(img, "red").predicted is None
    assert S.score_shape(img, "circle").predicted is None
    assert S.score_count(img, 0).correct


def test_two_objects_count_two_and_relation_flips():
    a = SceneObject("green", "circle", (14.0, 30.0), 9.0)
    b = SceneObject("purple", "star", (48.0, 34.0), 10.0)
    img = render([a, b], SIZE)
    n = S.score_count(img, 2)
    assert n.predicted == 2 and n.correct and n.abs_error == 0
    assert S.score_count(img, 3).abs_error == 1
    r = S.score_relation(img, "green", "purple", "to the left of")
    assert r.predicted == "left" and r.correct
    assert S.score_relation(img, ("purple", "star"), ("green", "circle"), "right").correct
    # Shift the green circle to the far right: the relation flips.
    moved = render([SceneObject("green", "circle", (52.0, 12.0), 9.0), SceneObject("purple", "star", (18.0, 34.0), 10.0)], SIZE)
    r2 = S.score_relation(moved, "green", "purple", "left")
    assert r2.predicted == "right" and not r2.correct
    # Vertical and diagonal schemes
    above = render([SceneObject("green", "circle", (32.0, 12.0), 8.0), SceneObject("purple", "star", (30.0, 50.0), 10.0)], SIZE)
    assert S.score_relation(above, "green", "purple", "above").correct
    assert S.score_relation(above, "purple", "green", "below").correct
    assert S.score_relation(moved, "green", "purple", "top right").correct
    # A colour that is not in the image: no prediction
    assert S.score_relation(img, "red", "purple", "left").predicted is None


def test_generated_scenes_scored_exactly():
    for i in range(6):
        s = procedural.image_sample(i, seed=0, image_size=SIZE)
        assert S.score_count(s["image"], len(s["objects"])).correct
        comps = S.connected_components(S.foreground_mask(s["image"]))
        for o in s["objects"]:
            mask = next(m for m in comps if m[int(o.centre[1]), int(o.centre[0])])
            assert S.score_colour(s["image"], o.colour, mask=mask).correct


def test_levenshtein():
    assert S.levenshtein("kitten", "sitting") == 3
    assert S.levenshtein("", "abc") == 3
    assert S.levenshtein("a b c".split(), "a x c d".split()) == 2


def test_text_cer_wer():
    sentence = probes.text_rendering(0, seed=0).answer
    perfect = S.score_text(sentence, sentence)
    assert perfect.cer == 0.0 and perfect.wer == 0.0 and perfect.correct
    # Line wrapping (newlines) in a transcript is not an error.
    assert S.score_text("the red fox", "the red\nfox").cer == 0.0
    # One substituted character: "the red fox" (11 chars, 3 words) -> "the rod fox"
    t = S.score_text("the red fox", "the rod fox")
    assert t.char_edits == 1 and t.cer == pytest.approx(1 / 11)
    assert t.word_edits == 1 and t.wer == pytest.approx(1 / 3)
    # A dropped word: "the red fox" -> "the fox": 4 char deletions ("red "), 1 word deletion
    d = S.score_text("the red fox", "the fox")
    assert d.cer == pytest.approx(4 / 11) and d.wer == pytest.approx(1 / 3)
    assert S.score_text("The Fox", "the fox", case_sensitive=False).correct
    assert S.score_text("", "").cer == 0.0
