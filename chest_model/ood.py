"""Flags inputs that are unlikely to be chest X-rays, with simple, documented signals.

- colour: mean chroma, (max(R,G,B) - min(R,G,B)) / 255, above ``config.max_chroma``. X-rays are
  grey; photographs are not. HSV saturation is not used: it explodes on dark, noisy grey pixels.
  The threshold is fitted on the validation images (1.25 × their 99th percentile, at least
  ``MAX_CHROMA``), because some collections store tinted X-rays;
- blank: grey-level standard deviation below ``MIN_CONTRAST`` (uniform or empty images);
- document: more than ``MAX_WHITE_FRACTION`` of the pixels near-white (scanned pages, screenshots);
- feature distance: far from the training X-rays in the backbone's feature space (feature_ood.py),
  above ``config.feature_threshold``, fitted on validation X-rays for a stated false-positive rate;
- low confidence: top calibrated probability below ``config.min_confidence``, a threshold fitted
  on the validation split at the end of training (its 2nd percentile, at most 0.5).

A flagged input is reported as "uncertain" with the reason instead of a confident class.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

MAX_CHROMA = 0.08
MIN_CONTRAST = 6.0
MAX_WHITE_FRACTION = 0.6
# A top class holding a majority is never "low confidence": a few dozen confident validation X-rays put
# their 2nd percentile near 0.9, which flags ordinary hard X-rays; telling those from non-X-rays is the
# feature gate's job.
MAX_MIN_CONFIDENCE = 0.5


def _thumbnail(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)


def _mean_chroma(small: np.ndarray) -> float:
    return float((small.max(axis=2).astype(np.float32) - small.min(axis=2)).mean() / 255)


def chroma(image: np.ndarray) -> float:
    return _mean_chroma(_thumbnail(image))


def fit_max_chroma_values(values) -> float:
    """1.25 x the 99th percentile of the validation images' mean chroma, at least ``MAX_CHROMA``."""
    return float(min(1.0, max(MAX_CHROMA, 1.25 * float(np.quantile(values, 0.99))))) if values else MAX_CHROMA


def fit_min_confidence(top_probabilities) -> float:
    """The validation X-rays' 2nd percentile of top probability, at most ``MAX_MIN_CONFIDENCE``."""
    values = np.asarray(top_probabilities, dtype=np.float64)
    return float(min(np.quantile(values, 0.02), MAX_MIN_CONFIDENCE)) if len(values) else 0.0


def image_flags(image: np.ndarray, max_chroma: float = MAX_CHROMA) -> list[str]:
    """Reasons (possibly none) why an RGB uint8 image does not look like a chest X-ray."""
    reasons = []
    small = _thumbnail(image)  # every check below reads the same 128-px thumbnail
    colour = _mean_chroma(small)
    if colour > max_chroma:
        reasons.append(f"colour image (mean chroma {colour:.2f}); X-rays are greyscale")
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    if gray.std() < MIN_CONTRAST:
        reasons.append(f"blank or uniform image (contrast {gray.std():.1f})")
    elif (gray > 235).mean() > MAX_WHITE_FRACTION:
        reasons.append(f"mostly white ({(gray > 235).mean():.0%} of pixels): looks like a document or screenshot")
    return reasons


def confidence_flag(probabilities: dict[str, float], min_confidence: float) -> list[str]:
    top = max(probabilities.values())
    return [f"low confidence ({top:.3f} < {min_confidence:.3f}: no class has a clear majority)"] if top < min_confidence else []


def feature_flag(score: float | None, config) -> list[str]:
    if score is None or not config.feature_threshold or score <= config.feature_threshold:
        return []
    from .feature_ood import reason

    return [reason(score, config.feature_threshold, config.feature_fpr)]


def ood_reasons(image: np.ndarray, probabilities: dict[str, float], config, *, feature_score: float | None = None) -> list[str]:
    """Every reason, under ``config``'s fitted thresholds, why this input is not a confident X-ray call."""
    broken = [] if all(math.isfinite(p) for p in probabilities.values()) else [
        "the model's output is not a number (NaN or inf): its weights or its computation on this input are broken"]
    return (broken + feature_flag(feature_score, config) + image_flags(image, config.max_chroma)
            + confidence_flag(probabilities, config.min_confidence))
