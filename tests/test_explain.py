"""Grad-CAM: it must point at the evidence when the evidence is known."""
import numpy as np
import torch

from chest_model import ChestXrayClassifier, ChestXrayConfig
from chest_model.explain import explain_image, gradcam, overlay
from helpers import synthetic_xray


def test_explanation_shapes_and_ranges(tiny_model):
    image = synthetic_xray(90, 70)
    result = explain_image(tiny_model, image)
    assert result.heatmap.shape == (90, 70) and result.heatmap.dtype == np.float32
    assert 0 <= result.heatmap.min() and result.heatmap.max() <= 1
    assert result.target_class in tiny_model.class_names
    assert abs(sum(result.probabilities.values()) - 1) < 1e-5
    assert result.probabilities == tiny_model.predict(image)
    other = next(c for c in tiny_model.class_names if c != result.target_class)
    assert explain_image(tiny_model, image, target_class=other).target_class == other
    blended = overlay(result.image, result.heatmap, 0.5)
    assert blended.shape == result.image.shape and blended.dtype == np.uint8


def test_gradcam_leaves_no_gradients_and_restores_mode(tiny_model):
    tiny_model.train()
    explain_image(tiny_model, synthetic_xray(64, 64))
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())


def test_gradcam_finds_a_planted_feature():
    """A model whose class-1 logit is the mean of one channel: the map must peak where that channel fires."""
    torch.manual_seed(0)
    model = ChestXrayClassifier(ChestXrayConfig(image_size=64, hidden_size=4)).eval()
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
                m.weight[0, 0, 1, 1] = 1.0  # channel 0 passes channel 0 of the input straight through
        model.head[2].weight.zero_(); model.head[2].bias.zero_(); model.head[2].weight[0, 0] = 1.0
        model.head[5].weight.zero_(); model.head[5].bias.zero_(); model.head[5].weight[1, 0] = 1.0
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 40:56, 8:24] = 5.0  # a bright patch, lower left
    cam, logits, index = gradcam(model, x, target=1)
    assert index == 1
    y, x_ = np.unravel_index(cam.argmax(), cam.shape)
    h, w = cam.shape
    assert y >= h // 2 and x_ < w // 2, (y, x_, cam.round(2))
