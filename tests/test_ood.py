"""Out-of-distribution flags: generated non-X-rays are flagged; X-rays are not."""
import cv2
import numpy as np

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
