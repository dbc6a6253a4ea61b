"""After training: temperature scaling and the thresholds, fitted on validation data only."""
import pytest
import torch

from chest_model.calibrate import fit_temperature


def test_temperature_scaling_recovers_the_temperature_that_made_the_logits_overconfident():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_no_validation_images_leave_the_temperature_at_one():
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
