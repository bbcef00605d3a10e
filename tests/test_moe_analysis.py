"""MoE specialisation analysis on a hand-made routing log (paper §6.2, App. E.8)."""

import math

import numpy as np
import pytest

from unimm.evaluation import moe_analysis as M


def test_rates_specialization_and_classes():
    k, n_text, n_image = 2, 10, 5
    # 2 layers x 4 experts; every token picks k experts, so each row sums to N * k.
    counts_text = np.array([[10, 6, 4, 0], [5, 5, 5, 5]])
    counts_image = np.array([[0, 2, 8, 0], [1, 1, 4, 4]])
    a = M.modality_analysis(counts_text, n_text, counts_image, n_image, k)
    # R = C / (N k): text / 20, image / 10
    np.testing.assert_allclose(a.rate_text, [[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(a.rate_image, [[0.0, 0.2, 0.8, 0.0], [0.1, 0.1, 0.4, 0.4]])
    # S = (Rt - Ri) / (Rt + Ri): 1, 0.1/0.5, -0.6/1.0, NaN ; 0.15/0.35 twice, -0.15/0.65 twice
    s = a.specialization
    assert s[0, 0] == 1.0 and s[0, 1] == pytest.approx(0.2) and s[0, 2] == pytest.approx(-0.6)
    assert math.isnan(s[0, 3])
    np.testing.assert_allclose(s[1], [3 / 7, 3 / 7, -3 / 13, -3 / 13])
    assert a.classes[0].tolist() == ["text", "multimodal", "vision", "unused"]
    assert a.classes[1].tolist() == ["multimodal"] * 4
    assert a.counts["text"].tolist() == [1, 0]
    assert a.counts["vision"].tolist() == [1, 0]
    assert a.counts["multimodal"].tolist() == [1, 4]
    assert a.counts["unused"].tolist() == [1, 0]
    np.testing.assert_allclose(a.fractions()["multimodal"], [1 / 3, 1.0])


def test_threshold_boundary_is_multimodal():
    assert M.classify(np.array([0.5, -0.5, 0.5001, -0.5001])).tolist() == ["multimodal", "multimodal", "text", "vision"]


def test_timestep_cv_by_hand():
    k = 1
    # 10 bins, 1 layer, 3 experts; bin b has 10 tokens except bin 0 with 20 (rates normalise it away).
    tokens = np.array([20] + [10] * 9)
    counts = np.zeros((10, 1, 3))
    counts[:, 0, 0] = tokens * 0.5  # constant rate 0.5 -> CV 0
    counts[:, 0, 1] = np.where(np.arange(10) % 2 == 0, 2, 6) * tokens / 10  # rates 0.2 / 0.6
    cv = M.timestep_cv(counts, tokens, k)
    assert cv.shape == (1, 3)
    assert cv[0, 0] == pytest.approx(0.0)
    # rates alternate 0.2 / 0.6: mean 0.4, population std 0.2 -> CV 0.5
    assert cv[0, 1] == pytest.approx(0.5)
    assert math.isnan(cv[0, 2])  # never selected: zero mean -> NaN
    assert M.timestep_bin([0.0, 0.05, 0.1, 0.999, 1.0]).tolist() == [0, 0, 1, 9, 9]


def test_understanding_generation_correlation_by_hand():
    und = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    gen = np.array([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 2.0, 4.0]])
    r = M.layer_correlations(und, gen)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and math.isnan(r[2])
    # x = (1, 2, 4), y = (1, 3, 2): dx = (-4/3, -1/3, 5/3), dy = (-1, 1, 0)
    # sum dx dy = 4/3 - 1/3 = 1 ; |dx|^2 = 42/9 ; |dy|^2 = 2 -> r = 1 / sqrt(84/9) = 3 / sqrt(84)
    assert M.pearson_r([1, 2, 4], [1, 3, 2]) == pytest.approx(3 / math.sqrt(84))


def test_png_writers(tmp_path):
    counts = {"text": np.array([5, 3]), "multimodal": np.array([2, 3]), "vision": np.array([1, 2]), "unused": np.array([0, 0])}
    for path in (
        M.plot_expert_classes(counts, tmp_path / "classes.png"),
        M.plot_cv_histogram(np.array([[0.1, 0.15, np.nan, 0.2]]), tmp_path / "cv.png"),
    ):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 1000
