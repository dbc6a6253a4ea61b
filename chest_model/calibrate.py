"""After training: fit everything a model needs to report honest probabilities and to say "uncertain".

- temperature scaling on the validation logits (fit_temperature);
- the low-confidence and colour thresholds of ood.py, on the validation X-rays;
- the feature-space statistics of feature_ood.py on the training images, and their threshold on the
  validation X-rays for a stated false-positive rate (feature_ood.fit_threshold).

Nothing here sees a test image or a non-X-ray image.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import feature_ood
from .engine import Predictions, metrics_from_logits
from .metrics import flagged_by_class
from .model import ChestXrayClassifier, autocast_context, calibrated_log_probabilities, calibrated_probabilities, eval_mode
from .ood import fit_max_chroma_values, fit_min_confidence

logger = logging.getLogger(__name__)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 that minimises NLL of ``logits / T``."""
    if len(labels) == 0:
        return 1.0
    # The fit is tiny: run it on the CPU in fp32, whatever device and precision the logits come from.
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    log_t = torch.zeros((), requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.nll_loss(calibrated_log_probabilities(logits, log_t.exp()), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.exp().item())
    return float(np.clip(temperature, 0.05, 20.0)) if math.isfinite(temperature) else 1.0


@torch.inference_mode()
def block_summaries(model: ChestXrayClassifier, images: torch.Tensor, *, batch_size: int = 32,
                    precision: str = "fp32") -> list[np.ndarray]:
    """Each block's ``(N, 2C)`` summary for cached uint8 ``(N, 3, S, S)`` images (summaries in fp32;
    the forward pass in ``precision``, as ``model.predict`` runs it)."""
    device = next(model.parameters()).device
    n_blocks = len(feature_ood.block_ends(model.features))
    with eval_mode(model), feature_ood.capture_block_stats(model.features) as captured, autocast_context(device, precision):
        for start in range(0, len(images), batch_size):
            batch = model.preprocessor.normalize(images[start : start + batch_size].to(device))
            model.forward_features(batch.contiguous(memory_format=torch.channels_last))
    return [torch.cat(block).cpu().numpy() for block in feature_ood.split_blocks(captured, n_blocks)]


def fit_feature_gate(model: ChestXrayClassifier, train_images: torch.Tensor, val_images: torch.Tensor | list[torch.Tensor],
                     *, fpr: float = feature_ood.DEFAULT_FPR, precision: str = "fp32", val_labels=None) -> dict[str, Any]:
    """Fit the statistics on training images and the threshold on validation X-rays; store both in the model.

    ``val_images`` are cached uint8 images, or their block summaries when the validation pass that
    chose the model already kept them. ``precision`` is the training run's: where bf16 is the fast
    choice the pass over every training image (a third of an epoch's compute) runs in it, as the
    demo's ``precision="auto"`` does. With ``val_labels``, the validation flags are also counted per
    class: the rate is a pooled one, and a class whose images the gate flags more often shows there.
    """
    means, precisions, scales = feature_ood.fit_statistics(block_summaries(model, train_images, precision=precision))
    model.set_feature_statistics(means, precisions, scales, threshold=float("inf"), fpr=fpr)
    if isinstance(val_images, torch.Tensor):
        val_images = [torch.from_numpy(x) for x in block_summaries(model, val_images, precision=precision)]
    return {**fit_feature_threshold(model, val_images, fpr=fpr, val_labels=val_labels), "n_train": len(train_images)}


def fit_feature_threshold(model: ChestXrayClassifier, val_summaries: list[torch.Tensor], *, fpr: float,
                          val_labels=None) -> dict[str, Any]:
    """Set the gate's threshold from the validation X-rays' block summaries (statistics already fitted);
    also how to fit it again on a saved model with a newer rule, without its training images."""
    val_scores = model.feature_scores(val_summaries).cpu()
    threshold = feature_ood.fit_threshold(val_scores.numpy(), fpr)
    rate = feature_ood.bounded_rate(len(val_scores), fpr)  # the rate asked, unless too few images bound it
    model.config.feature_threshold = threshold
    model.config.feature_fpr = float(rate)
    flagged = float((val_scores > threshold).double().mean())
    logger.info("feature gate: threshold %.3f for a false-positive rate of at most %.1f%% (%.1f%% of validation flagged)",
                threshold, 100 * rate, 100 * flagged)
    result = {"threshold": threshold, "fpr": rate, "rule": "split-conformal", "validation_flagged_rate": flagged}
    if val_labels is not None:
        result["validation_flagged_by_class"] = flagged_by_class((val_scores > threshold).numpy(), val_labels, model.class_names)
    return result


def calibrate(model: ChestXrayClassifier, val_pass: Predictions, val, train_images: torch.Tensor, *,
              fpr: float = feature_ood.DEFAULT_FPR, precision: str = "fp32") -> dict[str, Any]:
    """Fit temperature and every out-of-distribution threshold; return the calibrated validation metrics.

    ``val_pass`` is the chosen model's validation pass (logits, labels, and block summaries if it kept
    them); ``val`` is the validation split: its cached ``images`` and each decoded image's ``chroma``.
    """
    val_logits, val_labels = val_pass.logits, val_pass.labels
    class_names = model.class_names
    uncalibrated = metrics_from_logits(val_logits, val_labels, class_names)
    temperature = fit_temperature(val_logits, val_labels)
    model.config.temperature = temperature
    val_metrics = metrics_from_logits(val_logits, val_labels, class_names, temperature=temperature)
    val_metrics["ece_before_calibration"] = uncalibrated["ece"]
    logger.info("temperature %.3f: validation ECE %.3f -> %.3f", temperature, uncalibrated["ece"] or 0, val_metrics["ece"] or 0)
    top = calibrated_probabilities(val_logits, temperature).max(dim=1).values
    model.config.min_confidence = fit_min_confidence(top.tolist())
    model.config.max_chroma = fit_max_chroma_values(val.chroma)
    val_features = val_pass.block_summaries if val_pass.block_summaries is not None else val.images
    val_metrics["feature_gate"] = fit_feature_gate(model, train_images, val_features, fpr=fpr, precision=precision,
                                                   val_labels=val_labels.tolist())
    return val_metrics
