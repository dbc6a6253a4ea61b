"""Grad-CAM (Selvaraju et al., 2017) on the last convolutional block of the VGG backbone.

The map is taken at the output of ``model.cam_layer``, the last ReLU in ``features`` (14×14 for a
224-px input), the finest map that still sees the whole receptive field. VGG's ReLUs run in place, so
the activation is captured from that ReLU's own output (the tensor the max-pool reads), not from the
conv before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .errors import ChestModelError
from .hooks import this_thread_only
from .model import ChestXrayClassifier, calibrated_probabilities, eval_mode
from .preprocess import ImageSource


class TargetClassError(ChestModelError, ValueError):
    """A class to explain that the model does not have."""


class ExplainError(ChestModelError, ValueError):
    """No heat map can be drawn: the model's output for the image is not a number (broken weights)."""


@dataclass
class Explanation:
    image: np.ndarray            # the decoded RGB uint8 image (reduced-size decode for big JPEGs)
    heatmap: np.ndarray          # float32 in [0, 1], same height and width as ``image``
    target_class: str            # the class the map explains
    probabilities: dict[str, float]


def gradcam(model: ChestXrayClassifier, pixel_values: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, torch.Tensor, int]:
    """Grad-CAM for one normalized ``(1, 3, S, S)`` input: (map at feature resolution, logits, target index)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        captured["activation"] = output

    handle = model.cam_layer.register_forward_hook(this_thread_only(keep))
    try:
        # Gradients are needed even where the caller runs under torch.inference_mode().
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            # An input that requires grad keeps the graph alive on a model whose weights are frozen.
            logits = model(pixel_values.clone().requires_grad_(True))
            index = int(logits[0].argmax()) if target is None else int(target)
            activation = captured["activation"]
            (grads,) = torch.autograd.grad(logits[0, index], activation)
    finally:
        handle.remove()
    if not torch.isfinite(logits).all():
        # ReLU's backward pass turns NaN gradients into zeros: the map would look sound for an answer that is not.
        raise ExplainError("the model's output for this image is not a number, so there is nothing to explain")
    weights = grads[0].mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * activation[0]).sum(dim=0)).detach().float()
    # Scaled from its lowest to its highest value, as Grad-CAM maps are usually drawn. A map with no
    # spread (the score does not depend on where anything is) is all zeros, not all "hottest".
    low, high = cam.min(), cam.max()
    spread = high - low
    cam = (cam - low) / spread if spread > 1e-6 * max(float(high), 1e-12) else torch.zeros_like(cam)
    return cam.cpu().numpy(), logits.detach(), index


def explain_image(model: ChestXrayClassifier, source: ImageSource, target_class: str | None = None, *, name: str | None = None) -> Explanation:
    """Probabilities and a Grad-CAM heat map for one image, through the model's own preprocessing.

    ``target_class``: the class to explain (a class name); default, the predicted class.
    """
    if target_class is not None and target_class not in model.class_names:  # before decoding anything
        raise TargetClassError(f"target_class {target_class!r} is not one of the model's classes {model.class_names}")
    image = model.preprocessor.load(source, name=name)
    parameter = next(model.parameters())  # its device and dtype: a model cast to bf16 gets inputs to match
    pixel_values = model.preprocessor(image).unsqueeze(0).to(parameter.device, parameter.dtype)
    target = None if target_class is None else model.class_names.index(target_class)
    cam, logits, index = gradcam(model, pixel_values, target)
    probabilities = calibrated_probabilities(logits, model.config.temperature)[0].tolist()
    heatmap = cv2.resize(cam, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return Explanation(
        image=image,
        heatmap=np.clip(heatmap, 0, 1).astype(np.float32),
        target_class=model.class_names[index],
        probabilities=dict(zip(model.class_names, probabilities)),
    )


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The heat map in the JET colour map blended over the X-ray (RGB uint8 image, heat map in [0, 1]
    of the same height and width; values outside are clipped)."""
    image, heatmap = np.asarray(image), np.asarray(heatmap, dtype=np.float32)
    if image.dtype != np.uint8:
        raise ValueError(f"overlay needs a uint8 image (as explain_image returns), got {image.dtype}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if heatmap.shape != image.shape[:2]:
        raise ValueError(f"heat map shape {heatmap.shape} does not match the image's {image.shape[:2]}")
    if not np.isfinite(opacity):
        raise ValueError(f"opacity must be a number in [0, 1], got {opacity!r}")
    levels = np.rint(np.clip(np.nan_to_num(heatmap), 0, 1) * 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1]
    opacity = float(np.clip(opacity, 0, 1))
    return cv2.addWeighted(np.ascontiguousarray(image), 1 - opacity, colours, opacity, 0)
