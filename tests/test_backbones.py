"""backbones.py: torchvision's own VGG19 feature layers, and the ImageNet weight factory (offline here)."""
import math

import pytest
import torch
from torch import nn
from torchvision.models import vgg19, vgg19_bn

from chest_model import ChestXrayClassifier, PretrainedWeightsUnavailable
from chest_model.backbones import FEATURE_CHANNELS, build_features, imagenet_weights_name


@pytest.mark.parametrize("backbone, reference", [("vgg19", vgg19), ("vgg19_bn", vgg19_bn)])
def test_feature_layers_have_torchvisions_names_and_shapes(backbone, reference):
    with torch.device("meta"):  # shapes only: the reference's 100M-parameter classifier is never allocated
        theirs = [(k.removeprefix("features."), v.shape) for k, v in reference(weights=None).state_dict().items()
                  if k.startswith("features.")]
    ours = [(k, v.shape) for k, v in build_features(backbone).state_dict().items()]
    assert ours == theirs


def test_initialisation_is_torchvisions_and_the_output_has_the_heads_width():
    torch.manual_seed(0)
    features = build_features("vgg19_bn")
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    norms = [m for m in features if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 16
    first = convs[0]
    fan_out = first.out_channels * first.kernel_size[0] * first.kernel_size[1]
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.2)  # kaiming, fan_out, relu
    assert all(torch.all(c.bias == 0) for c in convs)
    assert all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)
    with torch.no_grad():
        assert features.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, FEATURE_CHANNELS, 1, 1)


def test_weights_are_named_by_torchvisions_enum():
    assert imagenet_weights_name("vgg19") == "torchvision VGG19_Weights.IMAGENET1K_V1"
    assert imagenet_weights_name("vgg19_bn") == "torchvision VGG19_BN_Weights.IMAGENET1K_V1"


def test_imagenet_factory_offline_names_the_file_the_cache_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        ChestXrayClassifier.from_imagenet(image_size=64)
    message = str(info.value)
    assert "vgg19-dcbb9e9d.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--weights none" in message


def test_imagenet_factory_loads_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    donor = ChestXrayClassifier(backbone="vgg19_bn", image_size=64)
    state = {k: v for k, v in donor.state_dict().items() if k.startswith("features.")}
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "vgg19_bn-c79401a0.pth")  # stands in for torchvision's file
    model = ChestXrayClassifier.from_imagenet(backbone="vgg19_bn", image_size=64)
    torch.testing.assert_close(model.features[0].weight, donor.features[0].weight)
    assert "IMAGENET1K_V1" in model.config.backbone_init
