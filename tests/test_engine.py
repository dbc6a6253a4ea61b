"""Metrics from logits, per-source metrics, temperature scaling, and the evaluation pass, on inputs whose answer is known."""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from chest_model.calibrate import block_summaries, fit_temperature
from chest_model.data import CachedImageDataset
from chest_model.engine import grouped_metrics, metrics_from_logits, predict_logits, train_one_epoch, unlearned_groups
from chest_model.model import calibrated_log_probabilities, calibrated_probabilities
from helpers import synthetic_xray

CLASSES = ["Normal", "Covid", "Viral Pneumonia"]


def _tempered_sample(temperature: float, n: int = 6000, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): the fitted T should be ``temperature``."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, 3, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(true_t):
    logits, labels = _tempered_sample(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_fit_temperature_without_data_is_the_identity():
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_calibrated_probabilities_are_the_tempered_softmax():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 10.0]], dtype=torch.bfloat16)
    expected = torch.softmax(logits.float() / 1.7, dim=1)
    torch.testing.assert_close(calibrated_probabilities(logits, 1.7), expected)
    torch.testing.assert_close(calibrated_log_probabilities(logits, 1.7), expected.log())
    assert calibrated_probabilities(logits, 1.7).dtype == torch.float32


def test_metrics_from_logits_loss_is_the_tempered_cross_entropy():
    logits, labels = _tempered_sample(2.0, n=300, seed=1)
    for temperature in (1.0, 2.0):
        metrics = metrics_from_logits(logits, labels, CLASSES, temperature=temperature)
        assert metrics["loss"] == pytest.approx(F.cross_entropy(logits / temperature, labels).item(), rel=1e-6)
        assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    # At the temperature the labels were drawn at, the loss is lower than uncalibrated.
    assert metrics_from_logits(logits, labels, CLASSES, temperature=2.0)["loss"] < metrics_from_logits(logits, labels, CLASSES)["loss"]
    # Logits straight from a forward pass (a graph attached) give the same figures.
    attached = logits.clone().requires_grad_(True)
    assert metrics_from_logits(attached, labels, CLASSES)["loss"] == pytest.approx(metrics_from_logits(logits, labels, CLASSES)["loss"])


def test_grouped_metrics_give_every_source_and_class_the_same_say():
    # Source "a": 4 Normal (3 right), 1 Covid (right). Source "b": 2 Covid (0 right). No Viral Pneumonia.
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    sources = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    logits = F.one_hot(predicted, 3).float()
    result = grouped_metrics(logits, labels, sources, ["a", "b", "c"], CLASSES)
    assert set(result["by_source"]) == {"a", "b"}  # "c" has no images
    a, b = result["by_source"]["a"], result["by_source"]["b"]
    assert a == {"n": 5, "accuracy": pytest.approx(0.8), "recall": {"Normal": 0.75, "Covid": 1.0}}
    assert b == {"n": 2, "accuracy": 0.0, "recall": {"Covid": 0.0}}
    assert result["group_recall"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)  # pooled accuracy would be 4/7


def test_unlearned_groups_name_every_group_recalled_below_half():
    by_source = {"kaggle": {"recall": {"Normal": 1.0, "Covid": 0.0, "Viral Pneumonia": 0.5}}, "nih": {"recall": {"Normal": 0.49}}}
    assert unlearned_groups(by_source) == ["Covid in kaggle (validation recall 0.00)", "Normal in nih (validation recall 0.49)"]
    assert unlearned_groups({"kaggle": {"recall": {"Normal": 0.5}}}) == []


def test_grouped_metrics_with_no_source_present_is_nan():
    result = grouped_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), ["a"], CLASSES)
    assert result["by_source"] == {} and math.isnan(result["group_recall"])


def test_the_validation_pass_keeps_the_block_summaries_the_gate_would_compute_itself(tiny_model):
    # The gate's threshold is fitted on the summaries kept by the validation pass that chose the
    # model: they must be those of a separate pass over the same images, in dataset order.
    images = torch.from_numpy(np.stack([np.stack([synthetic_xray(32, 32, seed=i, kind=i % 3)] * 3) for i in range(7)]))
    labels = [i % 3 for i in range(7)]
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(CachedImageDataset(images, labels), batch_size=3))  # a ragged last batch
    result = predict_logits(accelerator, tiny_model, loader, tiny_model.preprocessor, block_summaries=True)
    assert result.labels.tolist() == labels and result.logits.shape == (7, 3)
    separate = block_summaries(tiny_model, images)
    assert len(result.block_summaries) == len(separate) == 5
    for kept, own in zip(result.block_summaries, separate):
        torch.testing.assert_close(kept, torch.from_numpy(own), rtol=1e-4, atol=1e-5)
    assert predict_logits(accelerator, tiny_model, loader, tiny_model.preprocessor).block_summaries is None


class _SlowLoader:
    """A loader that takes ``delay`` seconds to produce each batch."""

    def __init__(self, images, labels, delay):
        self.batches = [(images[i:i + 2], labels[i:i + 2]) for i in range(0, len(labels), 2)]
        self.delay = delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_an_epoch_reports_the_share_of_its_time_spent_waiting_for_data(tiny_model):
    images = torch.from_numpy(np.stack([np.stack([synthetic_xray(32, 32, seed=i, kind=i % 3)] * 3) for i in range(6)]))
    labels = torch.tensor([i % 3 for i in range(6)])
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    shares = {}
    for delay in (0.0, 0.5):
        stats = train_one_epoch(accelerator, tiny_model, _SlowLoader(images, labels, delay), optimizer, None,
                                tiny_model.preprocessor, epoch=0)
        shares[delay] = stats["data_wait_share"] * stats["seconds"]  # seconds spent waiting
        assert stats["n"] == 6 and 0 <= stats["data_wait_share"] <= 1
    # Three batches: 1.5 s of waiting in the slow loader, and none to speak of in the other.
    assert 1.5 <= shares[0.5] < 1.5 + 0.25 and shares[0.0] < 0.1
    tiny_model.eval()


class _OverflowingOptimizer(torch.optim.SGD):
    """What accelerate's fp16 loss scaler reports after gradients overflowed: the step was skipped."""
    step_was_skipped = True

    def step(self, closure=None):
        return None


def test_the_schedule_waits_for_a_step_that_fp16s_loss_scaler_skipped(tiny_model):
    images = torch.from_numpy(np.stack([np.stack([synthetic_xray(32, 32, seed=i, kind=i % 3)] * 3) for i in range(4)]))
    labels = torch.tensor([i % 3 for i in range(4)])
    for optimizer_type, steps in ((_OverflowingOptimizer, 0), (torch.optim.SGD, 2)):
        optimizer = optimizer_type(tiny_model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        train_one_epoch(Accelerator(cpu=True), tiny_model, _SlowLoader(images, labels, 0.0), optimizer, scheduler,
                        tiny_model.preprocessor, epoch=0)
        assert scheduler.last_epoch == steps
    tiny_model.eval()
