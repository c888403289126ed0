"""The disagreement benchmark's measures: a ranking's AUROC, the errors among the top-scored pixels, bands."""

from __future__ import annotations

import numpy as np
import pytest


def test_auroc_is_the_chance_a_wrong_pixel_outscores_a_right_one(disagreement) -> None:
    wrong = np.array([0, 0, 1, 1, 0, 1], bool)
    assert disagreement.auroc(wrong.astype(float), wrong) == 1.0
    assert disagreement.auroc(1 - wrong.astype(float), wrong) == 0.0
    assert disagreement.auroc(np.ones(6), wrong) == 0.5, "ties count half"
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])  # pairs (wrong, right): 8 of 9 ordered right
    assert disagreement.auroc(score, wrong) == pytest.approx(8 / 9)
    assert np.isnan(disagreement.auroc(score, np.zeros(6, bool)))


def test_errors_in_top_and_bands_count_what_they_say(disagreement) -> None:
    score = np.linspace(0, 1, 100)
    wrong = np.zeros(100, bool)
    wrong[[99, 97, 50, 10]] = True
    assert disagreement.errors_in_top(score, wrong, 0.05) == 0.5  # 99 and 97 among the top 5
    rows = disagreement.band_rows(np.array([0.0, 0.1, 0.3, 0.5, 1.0]), np.array([0, 0, 1, 1, 1], bool))
    assert rows == [("0–0.05", 0.2, 0.0), ("0.05–0.2", 0.2, 0.0), ("0.2–0.5", 0.2, 1.0), ("0.5–1", 0.4, 1.0)]
