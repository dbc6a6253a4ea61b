"""Grad-CAM: it must point at the evidence when the evidence is known."""
import numpy as np
import pytest
import torch

from chest_model import ChestXrayClassifier, ChestXrayConfig
from chest_model.explain import ExplainError, explain_image, gradcam, overlay
from helpers import block_detector, centre_of_heat, film_with_block, synthetic_xray


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


@pytest.mark.parametrize("backbone", ["vgg19", "vgg19_bn"])
def test_cam_layer_is_the_last_relu_before_the_final_pool(backbone):
    """model.cam_layer names the layer Grad-CAM used to find by scanning: the same map comes out."""
    torch.manual_seed(0)
    model = ChestXrayClassifier(ChestXrayConfig(image_size=32, hidden_size=8, backbone=backbone)).eval()
    relus = [m for m in model.features if isinstance(m, torch.nn.ReLU)]
    assert model.cam_layer is relus[-1]
    assert isinstance(model.features[-1], torch.nn.MaxPool2d)
    assert list(model.features).index(model.cam_layer) == len(model.features) - 2

    # The map from a hook on the last ReLU found by scanning, computed here without explain.py.
    x = torch.randn(1, 3, 32, 32)
    captured = {}
    handle = relus[-1].register_forward_hook(lambda _m, _i, out: captured.update(activation=out))
    try:
        logits = model(x)
        (grads,) = torch.autograd.grad(logits[0, 1], captured["activation"])
    finally:
        handle.remove()
    expected = torch.relu((grads[0].mean(dim=(1, 2))[:, None, None] * captured["activation"][0]).sum(dim=0)).detach()
    assert expected.max() > expected.min()  # a non-trivial map, so the comparison below can fail
    expected = ((expected - expected.min()) / (expected.max() - expected.min())).numpy()
    cam, _, index = gradcam(model, x, target=1)
    assert index == 1 and cam.shape == expected.shape == (2, 2)
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)


def test_an_unknown_target_class_is_named_in_the_error(tiny_model):
    with pytest.raises(ValueError, match="'Pneumothorax' is not one of the model's classes"):
        explain_image(tiny_model, synthetic_xray(64, 64), target_class="Pneumothorax")


def test_explain_works_inside_inference_mode_and_on_a_cast_model(tiny_model):
    image = synthetic_xray(40, 40)
    expected = explain_image(tiny_model, image)
    with torch.inference_mode():
        inside = explain_image(tiny_model, image)
    np.testing.assert_allclose(inside.heatmap, expected.heatmap, atol=1e-6)
    assert explain_image(tiny_model.to(torch.float64), image).target_class == expected.target_class


def test_overlay_refuses_what_it_would_draw_wrong():
    image = np.full((20, 30, 3), 128, np.uint8)
    hot = overlay(image, np.full((20, 30), 1.5, np.float32), opacity=1.0)  # above 1: the hottest colour, not wrapped round
    assert hot[0, 0, 0] > 100 and hot[0, 0, 2] < 50
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, np.zeros((20, 30), np.float32), opacity=float("nan"))
    with pytest.raises(ValueError, match=r"heat map shape \(10, 10\) does not match the image's \(20, 30\)"):
        overlay(image, np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="uint8 image"):
        overlay(image.astype(np.uint16), np.zeros((20, 30), np.float32))


def test_explain_works_on_a_model_whose_weights_are_frozen(tiny_model):
    image = synthetic_xray(40, 40)
    expected = explain_image(tiny_model, image)
    tiny_model.requires_grad_(False)  # as a server often does
    try:
        frozen = explain_image(tiny_model, image)
    finally:
        tiny_model.requires_grad_(True)
    np.testing.assert_allclose(frozen.heatmap, expected.heatmap, atol=1e-6)


@pytest.mark.parametrize("height, width", [(300, 200), (200, 300)])
def test_the_map_lands_on_the_film_where_the_evidence_is(height, width):
    """The input is a square stretch of a film of another shape: the map must be stretched back, not
    transposed, flipped or letterboxed."""
    model = block_detector(128)
    result = explain_image(model, film_with_block(height, width, top=0.6, left=0.1), "Covid")
    assert result.heatmap.shape == (height, width)
    y, x = centre_of_heat(result.heatmap)
    assert abs(y - 0.7) < 0.08 and abs(x - 0.2) < 0.08, (y, x)


def test_a_map_with_no_spread_is_drawn_cold_not_hot():
    """A score that does not depend on where anything is: every cell the same. Scaled by its peak alone
    it would be drawn as the hottest colour everywhere."""
    model = block_detector()
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.fill_(1.0)  # every activation the same, whatever the image
    cam, logits, _ = gradcam(model, model.preprocessor(np.dstack([synthetic_xray(90, 70)] * 3)).unsqueeze(0), target=1)
    assert logits[0, 1] > 0 and cam.shape == (4, 4)  # the score is positive, and the same from every cell
    assert explain_image(model, synthetic_xray(90, 70), "Covid").heatmap.max() == 0.0


def test_a_model_that_outputs_nan_gets_no_map():
    model = block_detector()
    with torch.no_grad():
        model.head[5].weight[0, 0] = float("nan")
    with pytest.raises(ExplainError, match="not a number"):
        explain_image(model, film_with_block(120, 100, 0.2, 0.2))
