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


def test_calibrate_stores_the_temperature_and_every_threshold_in_the_model(tiny_model, tmp_path):
    """What training saves: the fitted values must reach the model's config, not just the returned metrics."""
    from types import SimpleNamespace

    from chest_model.calibrate import calibrate
    from chest_model.engine import Predictions
    from chest_model.model import calibrated_probabilities
    from chest_model.ood import fit_max_chroma_values, fit_min_confidence

    torch.manual_seed(0)
    n = 120
    true_logits = torch.randn(n, 3) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    logits = true_logits * 3.0  # overconfident: the fitted temperature is far from 1
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    chromas = [0.001 * i for i in range(n)]
    val = SimpleNamespace(images=images, chroma=chromas)
    metrics = calibrate(tiny_model, Predictions(logits, labels), val, images)

    config = tiny_model.config
    assert config.temperature == pytest.approx(fit_temperature(logits, labels)) and config.temperature > 2
    top = calibrated_probabilities(logits, config.temperature).max(dim=1).values.tolist()
    assert config.min_confidence == pytest.approx(fit_min_confidence(top)) and config.min_confidence > 0
    assert config.max_chroma == pytest.approx(fit_max_chroma_values(chromas)) and config.max_chroma > 0.08
    assert metrics["ece"] < metrics["ece_before_calibration"]
    assert config.feature_threshold == metrics["feature_gate"]["threshold"] < float("inf")

    from chest_model import ChestXrayClassifier

    tiny_model.save_pretrained(tmp_path / "model")  # what training writes is what a user loads
    loaded = ChestXrayClassifier.from_pretrained(tmp_path / "model").config
    for key in ("temperature", "min_confidence", "max_chroma", "feature_threshold"):
        assert getattr(loaded, key) == pytest.approx(getattr(config, key)), key
