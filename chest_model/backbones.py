"""VGG19 feature extractors with torchvision's parameter names, and the ImageNet weight factory.

The backbone is built with torchvision's own ``make_layers``, so ``features.*`` names and shapes are
exactly those of ``torchvision.models.vgg19().features`` (or ``vgg19_bn``) and ImageNet weights load
unchanged. Building it this way skips the 100M-parameter ImageNet classifier that ``vgg19()`` would
allocate and initialise only for us to throw away.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import VGG19_BN_Weights, VGG19_Weights
from torchvision.models.vgg import cfgs, make_layers

from .errors import ChestModelError

IMAGENET_WEIGHTS = {"vgg19": VGG19_Weights.IMAGENET1K_V1, "vgg19_bn": VGG19_BN_Weights.IMAGENET1K_V1}
FEATURE_CHANNELS = 512


class PretrainedWeightsUnavailable(ChestModelError, RuntimeError):
    """ImageNet weights could not be downloaded or found in the torch hub cache."""


def build_features(backbone: str) -> nn.Sequential:
    features = make_layers(cfgs["E"], batch_norm=(backbone == "vgg19_bn"))
    # torchvision's VGG initialisation, which make_layers alone does not apply.
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return features


def imagenet_weights_name(backbone: str) -> str:
    return f"torchvision {IMAGENET_WEIGHTS[backbone]!s}"


def imagenet_features_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The ImageNet ``features.*`` tensors for ``backbone``, downloaded once into the torch hub cache."""
    weights = IMAGENET_WEIGHTS[backbone]
    filename = os.path.basename(weights.url)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    try:
        # torchvision loads its own checkpoint with weights_only=True.
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # noqa: BLE001 - URLError, OSError, hash mismatch...
        raise PretrainedWeightsUnavailable(
            f"Could not get the ImageNet weights for {backbone} ({filename}): {err}.\n"
            f"  - Download {weights.url} on a machine with internet access and put it at {cached}\n"
            f"    (the torch hub cache; set TORCH_HOME to move it), or\n"
            f"  - train from random initialisation instead with --weights none."
        ) from err
    return {key: value for key, value in state.items() if key.startswith("features.")}
