"""Out-of-distribution flags: generated non-X-rays are flagged; X-rays are not."""
import cv2
import numpy as np
import pytest

from chest_model.ood import chroma, fit_max_chroma_values, fit_min_confidence, image_flags
from helpers import synthetic_xray


def non_xrays():
    rng = np.random.default_rng(0)
    photos = [cv2.GaussianBlur(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8), (0, 0), 8) for _ in range(4)]
    photos = [cv2.normalize(p, None, 0, 255, cv2.NORM_MINMAX) for p in photos]
    sky = np.zeros((120, 160, 3), np.uint8)
    sky[:] = (90, 160, 230)
    blank = [np.full((100, 100, 3), v, np.uint8) for v in (0, 128, 255)]
    document = np.full((200, 150, 3), 255, np.uint8)
    for y in range(20, 190, 12):
        document[y : y + 3, 15 : int(rng.integers(60, 140))] = 20
    return photos + [sky, document] + blank


def test_generated_non_xrays_are_flagged():
    flagged = [bool(image_flags(im)) for im in non_xrays()]
    assert np.mean(flagged) == 1.0


def test_grey_xrays_are_not_flagged():
    images = [np.dstack([synthetic_xray(120, 100, seed=i, kind=i % 3)] * 3) for i in range(10)]
    assert not any(image_flags(im) for im in images)


def test_thresholds_fitted_on_validation_data():
    tinted = [np.dstack([g, np.clip(g.astype(int) + 30, 0, 255).astype(np.uint8), g]) for g in (synthetic_xray(80, 80, seed=i) for i in range(8))]
    limit = fit_max_chroma_values([chroma(im) for im in tinted])
    assert not any(image_flags(im, limit) for im in tinted)
    assert all(image_flags(im, limit) for im in non_xrays()[:4])
    assert fit_min_confidence([0.9] * 98 + [0.5, 0.4]) < 0.9


def test_min_confidence_is_the_validation_2nd_percentile_capped_at_one_half():
    low = [0.35 + 0.005 * i for i in range(100)]  # every value below 0.85; 2nd percentile 0.3599
    assert fit_min_confidence(low) == pytest.approx(np.quantile(low, 0.02))
    assert fit_min_confidence([0.99] * 100) == 0.5  # a model sure of every validation image still flags below 0.5
    assert fit_min_confidence([]) == 0.0


def test_colour_limit_is_a_quarter_above_the_validation_99th_percentile_with_a_floor():
    values = [0.1 + 0.001 * i for i in range(101)]
    assert fit_max_chroma_values(values) == pytest.approx(1.25 * np.quantile(values, 0.99))
    assert fit_max_chroma_values([0.0] * 50) == 0.08  # grey validation films: the default limit, not zero
    assert fit_max_chroma_values([]) == 0.08
