"""One training epoch and one evaluation pass, in accelerate's idioms.

Loss and accuracy come from the same forward pass and are summed over samples, then reduced
across processes; evaluation gathers logits with ``gather_for_metrics`` so every sample counts once.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from . import feature_ood
from .data import derived_seed
from .errors import ChestModelError
from .metrics import classification_metrics
from .model import calibrated_log_probabilities, calibrated_probabilities
from .preprocess import Preprocessor

logger = get_logger(__name__)


class NonFiniteLossError(ChestModelError, RuntimeError):
    """The loss became NaN or inf; training stops before any bad weights are saved."""


def train_one_epoch(
    accelerator,
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    preprocessor: Preprocessor,
    *,
    epoch: int,
    class_weights: torch.Tensor | None = None,
    logit_offset: torch.Tensor | None = None,
    on_step=None,
    skip_batches: int = 0,
    start_step: int = 0,
    carried: dict[str, float] | None = None,
    seed: int | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> dict[str, float]:
    """Train for one pass over ``loader``.

    With ``seed``, the random state (dropout) of every batch is reseeded from (seed, epoch, batch,
    rank). Training is then a pure function of the seed, so a run resumed mid-epoch matches an
    uninterrupted one bit for bit, however many RNG draws the data loader makes when it restarts.
    ``logit_offset`` (the log class prior of the draws) is added to the logits in the loss only.
    ``on_step(step, sums)`` is called after every step; ``sums()`` (a collective: every process calls
    it) gives the epoch's totals so far, which a mid-epoch checkpoint keeps and a resume passes back
    as ``carried``, so the epoch's loss, accuracy and time cover all of its batches.
    """
    model.train()
    device = accelerator.device
    weights = class_weights.to(device) if class_weights is not None else None
    offset = logit_offset.to(device) if logit_offset is not None else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    start = time.perf_counter()
    progress = tqdm(loader, desc=f"epoch {epoch + 1} train", leave=False, disable=None if accelerator.is_local_main_process else True,
                    initial=skip_batches, total=skip_batches + len(loader))
    step = start_step
    base = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0, **(carried or {})}

    def sums() -> dict[str, float]:
        totals = accelerator.reduce(torch.stack([loss_sum, correct.double(), seen.double()]), reduction="sum").tolist()
        return {"loss_sum": base["loss_sum"] + totals[0], "correct": base["correct"] + totals[1],
                "seen": base["seen"] + totals[2], "seconds": base["seconds"] + time.perf_counter() - start}

    # Time spent waiting for the loader: the step ends in a host sync (loss.item()), so on a GPU too
    # this is the data pipeline's share of the epoch, not queued work.
    data_seconds, ready = 0.0, time.perf_counter()
    for images, labels in progress:
        data_seconds += time.perf_counter() - ready
        if seed is not None:
            torch.manual_seed(derived_seed(seed, epoch, step, accelerator.process_index))
        inputs = preprocessor.normalize(images).contiguous(memory_format=memory_format)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(inputs)
            scored = logits.float() if offset is None else logits.float() + offset  # what the loss sees
            loss = F.cross_entropy(scored, labels, weight=weights)
            _check_finite(accelerator, loss, epoch, step)
            accelerator.backward(loss)
            optimizer.step()
            # fp16's loss scaler skips a step whose gradients overflowed: the schedule waits for it.
            if accelerator.sync_gradients and scheduler is not None and not getattr(optimizer, "step_was_skipped", False):
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            hits = logits.argmax(dim=1) == labels
            state = accelerator.gradient_state
            if accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
                # accelerate fills the last global batch with repeats of the first samples: its real
                # samples are counted once, on the main process (the others add nothing).
                each = F.cross_entropy(scored, labels, weight=weights, reduction="none")
                hits, each = accelerator.gather_for_metrics((hits, each))
                if accelerator.is_main_process:
                    loss_sum += each.double().sum()
                    correct += hits.sum()
                    seen += hits.numel()
            else:
                loss_sum += loss.detach().double() * labels.numel()
                correct += hits.sum()
                seen += labels.numel()
        step += 1
        loss_value = loss.item()
        progress.set_postfix(loss=f"{loss_value:.4f}")
        if accelerator.trackers:  # per-step curves for --report-to
            accelerator.log({"train/loss": loss_value, "train/lr": optimizer.param_groups[0]["lr"]},
                            step=epoch * (skip_batches + len(loader)) + step)
        if on_step is not None:
            on_step(step, sums)
        ready = time.perf_counter()
    data_share = data_seconds / max(time.perf_counter() - start, 1e-9)  # this process's, since it started
    total = sums()
    loss_total, correct_total, n, elapsed = total["loss_sum"], total["correct"], total["seen"], total["seconds"]
    return {
        "loss": loss_total / max(n, 1),
        "accuracy": correct_total / max(n, 1),
        "n": int(n),
        "seconds": elapsed,
        "images_per_s": n / elapsed if elapsed > 0 else 0.0,
        "data_wait_share": data_share,
    }


def _check_finite(accelerator, loss: torch.Tensor, epoch: int, step: int) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")  # every process stops together
    if bad.item() > 0:
        # With several processes, the one whose loss is finite says so too: they all stop here together.
        where = "" if accelerator.num_processes == 1 else f" on {int(bad.item())} of {accelerator.num_processes} processes (this one: {loss.item()})"
        value = f"non-finite{where}" if where else str(loss.item())
        raise NonFiniteLossError(
            f"loss became {value} at epoch {epoch + 1}, step {step}; stopping without saving these weights. "
            "Lower --lr, check the data, or try --mixed_precision no."
        )


class Predictions(NamedTuple):
    logits: torch.Tensor
    labels: torch.Tensor
    block_summaries: list[torch.Tensor] | None = None  # per VGG block, (N, 2C): what the feature gate is fitted on


@torch.no_grad()
def predict_logits(accelerator, model: torch.nn.Module, loader, preprocessor: Preprocessor, desc: str = "eval", *,
                   block_summaries: bool = False) -> Predictions:
    """Logits and labels for a whole dataset, gathered across processes (each sample exactly once).

    Inputs go in channels_last, as ``model.predict`` sends them: for inference it is the faster format
    even where fp32 training prefers contiguous (VGG19, 224 px, on an AVX2 CPU: 4.0 against 3.4 img/s).
    With ``block_summaries`` the same pass keeps each block's feature summary, so fitting the feature
    gate needs no second pass over these images.
    """
    model.eval()
    features = accelerator.unwrap_model(model).features
    n_blocks = len(feature_ood.block_ends(features))
    logits_parts, label_parts, summary_parts = [], [], []
    capture = feature_ood.capture_block_stats(features) if block_summaries else contextlib.nullcontext([])
    with capture as captured:
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=None if accelerator.is_local_main_process else True):
            inputs = preprocessor.normalize(images).contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                logits = model(inputs).float()
            batch = accelerator.gather_for_metrics((logits, labels, *captured))
            captured.clear()
            logits_parts.append(batch[0].cpu())
            label_parts.append(batch[1].cpu())
            summary_parts.append([x.cpu() for x in batch[2:]])
    summaries = [torch.cat([part[b] for part in summary_parts]) for b in range(n_blocks)] if block_summaries else None
    return Predictions(torch.cat(logits_parts), torch.cat(label_parts), summaries)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], *, temperature: float = 1.0) -> dict[str, Any]:
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    probabilities = calibrated_probabilities(logits, temperature).numpy()
    metrics = classification_metrics(labels.numpy(), probabilities, class_names)
    metrics["loss"] = float(F.nll_loss(calibrated_log_probabilities(logits, temperature), labels).item()) if len(labels) else math.nan
    return metrics


# A (source, class) group recalled less often than this has not been learned: near chance with three
# classes. A run from random initialisation can end that way (one of four leave-one-source-out runs of
# the starter command chose an epoch with validation Covid recall 0.00).
UNLEARNED_RECALL = 0.5


def unlearned_groups(by_source: dict[str, Any]) -> list[str]:
    """The validation (source, class) groups the model recalls less than ``UNLEARNED_RECALL`` of, in words."""
    return [f"{cls} in {source} (validation recall {recall:.2f})" for source, row in by_source.items()
            for cls, recall in row["recall"].items() if recall < UNLEARNED_RECALL]


def grouped_metrics(logits: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, source_names: list[str],
                    class_names: list[str]) -> dict[str, Any]:
    """Accuracy and per-class recall for each source, and their mean recall over every (source, class) group.

    A pooled score lets the largest group win: a pool of mostly adult normals scores well while
    every Covid image is missed. The group mean gives each source's each class the same say.
    """
    predictions = logits.argmax(dim=1)
    by_source, recalls = {}, []
    for k, name in enumerate(source_names):
        in_source = sources == k
        if not in_source.any():
            continue
        recall = {}
        for c, class_name in enumerate(class_names):
            group = in_source & (labels == c)
            if group.any():
                recall[class_name] = float((predictions[group] == c).float().mean())
                recalls.append(recall[class_name])
        by_source[name] = {"n": int(in_source.sum()), "accuracy": float((predictions[in_source] == labels[in_source]).float().mean()),
                           "recall": recall}
    return {"by_source": by_source, "group_recall": float(np.mean(recalls)) if recalls else math.nan}
