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


def test_temperature_is_fitted_from_logits_in_any_precision_and_with_a_graph_attached():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    features = torch.randn(200, 4)
    labels = layer(features).argmax(1)
    logits = layer(features) * 3  # still attached to the layer's graph, as a caller's forward pass leaves it
    plain = fit_temperature(logits.detach(), labels)
    assert fit_temperature(logits, labels) == pytest.approx(plain, rel=1e-5)
    assert fit_temperature(logits.detach().bfloat16(), labels) == pytest.approx(plain, rel=0.05)
