"""Feature-space out-of-distribution score: how far an input's backbone activations lie from the training X-rays'.

Each VGG block's output is summarised by its per-channel mean and standard deviation (the image's
texture statistics at that scale). For every block, the Mahalanobis distance of that summary to the
training X-rays (Ledoit-Wolf shrunk covariance, since there are fewer images than dimensions) is
divided by the 99th percentile of held-out training images' distances (out-of-fold: each fold
scored by statistics fitted without it). An input's score is the largest of these ratios over the
blocks: photographs, documents and other modalities stand out at some scale even when the head is
confident.

Why out-of-fold: with fewer images than dimensions, a covariance fits its own images closely, so
their in-sample distances understate an unseen X-ray's, and by how much differs per block. On the
starter model (456 training images) the in-sample 99th percentiles were 1.15 to 1.9 times smaller
than the held-out ones, which matched the validation images' to within 15%; with in-sample units one
block decided 77 of the 81 validation scores. Out-of-fold units put every block on the scale of
unseen X-rays, so the maximum compares like with like.

The statistics are fitted on training images and stored as buffers in ``model.safetensors``; the
threshold is the split-conformal rank of the validation X-rays' scores for a stated rate, stored in
``config.json`` with that rate: a new X-ray like the validation ones is flagged with probability at
most ``fpr``. The bound says nothing of X-rays unlike them, which may lie further out: the starter
model's test films (the same collection's test split) scored higher than its validation films.
No non-X-ray image is used to fit anything.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .hooks import this_thread_only

logger = logging.getLogger(__name__)

BUFFER_PREFIX = "ood_"
# 99th percentile of held-out training distances: each block's distance is expressed in these units.
TRAIN_QUANTILE = 0.99
SCALE_FOLDS = 5
DEFAULT_FPR = 0.02


def block_ends(features: nn.Sequential) -> list[nn.Module]:
    """The max-pools that close VGG's five blocks; their inputs are the blocks' outputs."""
    return [m for m in features if isinstance(m, nn.MaxPool2d)]


def block_dims(features: nn.Sequential) -> list[int]:
    """Summary size per block: mean and standard deviation of each of the block's channels."""
    dims, channels = [], 3
    for module in features:
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        elif isinstance(module, nn.MaxPool2d):
            dims.append(2 * channels)
    return dims


@contextlib.contextmanager
def capture_block_stats(features: nn.Sequential) -> Iterator[list[torch.Tensor]]:
    """Collect each block's ``(N, 2C)`` summary during the forward passes run inside the block."""
    captured: list[torch.Tensor] = []

    def keep(_module, inputs):
        captured.append(summarise(inputs[0].detach()))

    handles = [pool.register_forward_pre_hook(this_thread_only(keep)) for pool in block_ends(features)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def summarise(activations: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` activations -> ``(N, 2C)``: each channel's mean and standard deviation, in fp32.

    One image at a time: a whole batch's fp32 copy of block 1 (hundreds of MB) is read from memory
    twice, one image's stays in cache; a third faster in bf16, the same values to fp32 rounding.
    """
    rows = []
    for image in activations:
        std, mean = torch.std_mean(image.float(), dim=(1, 2))
        rows.append(torch.cat([mean, std]))
    return torch.stack(rows) if rows else activations.new_zeros((0, 2 * activations.shape[1]), dtype=torch.float32)


def split_blocks(captured: list[torch.Tensor], n_blocks: int) -> list[list[torch.Tensor]]:
    """Hooks append block by block, batch after batch: regroup into one list per block."""
    return [captured[b::n_blocks] for b in range(n_blocks)]


def fit_statistics(block_summaries: list[np.ndarray], *, folds: int = SCALE_FOLDS,
                   seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per block: mean and precision matrix (Ledoit-Wolf) of every training summary, and the 99th
    percentile of out-of-fold distances (in-sample ones where there are too few images to hold out)."""
    from sklearn.covariance import LedoitWolf

    means, precisions, scales = [], [], []
    n = len(block_summaries[0]) if block_summaries else 0
    fold_of = np.random.default_rng(seed).permutation(n) % folds if n >= 2 * folds else None
    for x in block_summaries:
        x = np.asarray(x, dtype=np.float64)
        estimator = LedoitWolf().fit(x)
        means.append(estimator.location_)
        precisions.append(estimator.precision_)
        distances = (_distances(x, estimator.location_, estimator.precision_) if fold_of is None
                     else _out_of_fold_distances(x, fold_of, folds))
        scales.append(float(np.quantile(distances, TRAIN_QUANTILE)))
    return means, precisions, np.asarray(scales)


def _out_of_fold_distances(x: np.ndarray, fold_of: np.ndarray, folds: int) -> np.ndarray:
    """Each image's distance under the Ledoit-Wolf fit of the other folds. A Cholesky solve, not the
    estimator's eigendecomposition: 0.11 against 0.58 s a fit on 1024 dimensions (AVX2 CPU), the same
    distances to 1e-11."""
    from scipy.linalg import cho_factor, cho_solve
    from sklearn.covariance import LedoitWolf

    distances = np.empty(len(x))
    for k in range(folds):
        held_out = fold_of == k
        rest = x[~held_out]
        # The covariance only: sklearn's ledoit_wolf() also computes a precision matrix (pinvh) that
        # is not used here, a third of this function's time at 1024 dimensions.
        covariance = LedoitWolf(store_precision=False).fit(rest).covariance_
        centred = x[held_out] - rest.mean(axis=0)
        solved = cho_solve(cho_factor(covariance), centred.T)
        distances[held_out] = np.sqrt(np.maximum(np.einsum("ij,ji->i", centred, solved), 0))
    return distances


def _distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = x - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, precision, centred), 0))


def scores(block_summaries: list[torch.Tensor], means: list[torch.Tensor], precisions: list[torch.Tensor],
           scales: torch.Tensor) -> torch.Tensor:
    """``(N,)`` scores: the largest over blocks of distance / training 99th percentile."""
    ratios = []
    for b, x in enumerate(block_summaries):
        # Summaries kept on the CPU by a validation pass meet statistics stored on the model's device.
        centred = x.to(means[b].device).double() - means[b].double()
        squared = torch.einsum("ij,jk,ik->i", centred, precisions[b].double(), centred).clamp(min=0)
        ratios.append(squared.sqrt() / scales[b].double())
    return torch.stack(ratios, dim=1).max(dim=1).values.float().to(block_summaries[0].device)


def fit_threshold(validation_scores, fpr: float = DEFAULT_FPR) -> float:
    """The split-conformal threshold: the ``ceil((n + 1) * (1 - fpr))``-th smallest of ``n`` validation scores.

    A new X-ray exchangeable with the validation ones scores above it with probability at most ``fpr``,
    on average over the validation sets one could have drawn (Vovk et al. 2005; Angelopoulos & Bates
    2021, section 1.1); one fitted threshold may flag a little more or less. The interpolated
    ``1 - fpr`` quantile is no such bound: on 81 validation X-rays at 2% it lies below two of them, so
    about 3% of new ones exceed it. With fewer than ``1 / fpr - 1`` images no score gives the bound;
    the largest is used, which bounds the rate at ``1 / (n + 1)`` (:func:`bounded_rate`), and a
    warning says so.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"the feature gate's false-positive rate must lie strictly between 0 and 1, got {fpr!r}")
    values = np.sort(np.asarray(validation_scores, dtype=np.float64))
    n = len(values)
    if not n:
        raise ValueError("cannot fit the feature threshold without validation images")
    rank = _conformal_rank(n, fpr)
    if rank > n:
        logger.warning("%d validation images are too few to bound the feature gate's false-positive rate at %.1f%%: "
                       "the threshold is their largest score, which bounds it at %.1f%%", n, 100 * fpr, 100 / (n + 1))
        rank = n
    return float(values[rank - 1])


def bounded_rate(n: int, fpr: float) -> float:
    """The false-positive rate that :func:`fit_threshold` bounds with ``n`` validation scores: ``fpr``,
    or ``1 / (n + 1)`` where ``n`` is too few for it."""
    return fpr if _conformal_rank(n, fpr) <= n else 1 / (n + 1)


def _conformal_rank(n: int, fpr: float) -> int:
    return math.ceil((n + 1) * (1 - fpr) - 1e-9)  # the tolerance keeps an exact product, e.g. 100 * 0.99, exact


def reason(score: float, threshold: float, fpr: float) -> str:
    return (f"unlike the training X-rays (feature distance {score:.2f} > {threshold:.2f}, "
            f"fitted on validation X-rays for a {fpr:.0%} false-positive rate)")
