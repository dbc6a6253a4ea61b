import json
from dataclasses import fields

import pytest

from chest_model import ChestXrayConfig, ConfigError


def test_defaults_are_the_tutorials_three_classes_at_224():
    config = ChestXrayConfig()
    assert config.class_names == ["Normal", "Covid", "Viral Pneumonia"]
    assert config.image_size == 224
    assert config.mean == [0.485, 0.456, 0.406] and config.std == [0.229, 0.224, 0.225]
    assert config.backbone == "vgg19" and config.hidden_size == 256 and config.backbone_init == "random"


def test_json_round_trip_keeps_types(tmp_path):
    config = ChestXrayConfig(class_names=("A", "B"), image_size=64, mean=(0.5, 0.5, 0.5), backbone="vgg19_bn", temperature=1.7)
    config.save(tmp_path / "config.json")
    loaded = ChestXrayConfig.load(tmp_path / "config.json")
    assert type(loaded) is ChestXrayConfig
    assert loaded == config
    assert isinstance(loaded.class_names, list) and isinstance(loaded.mean, list)
    for f in fields(ChestXrayConfig):
        assert type(getattr(loaded, f.name)) is type(getattr(config, f.name)), f.name


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"image_size": "224"}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"class_names": "Normal"}, "class_names"),
        ({"class_names": ["A", "A"]}, "unique"),
        ({"class_names": ["only"]}, "at least 2"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"backbone": "resnet50"}, "backbone"),
        ({"dropout": 1.5}, "dropout"),
        ({"temperature": -1}, "temperature"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"surprise": 1}, "unknown key"),
    ],
)
def test_wrong_values_are_rejected_with_the_field_named(tmp_path, patch, message):
    data = {**ChestXrayConfig().to_dict(), **patch}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        ChestXrayConfig.load(tmp_path / "config.json")


def test_non_json_and_non_object_configs_are_rejected(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ChestXrayConfig.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ChestXrayConfig.load(tmp_path / "b.json")


@pytest.mark.parametrize("key", ["class_names", "image_size", "mean", "std", "backbone", "hidden_size"])
def test_a_saved_config_missing_a_key_that_shapes_the_model_is_refused(tmp_path, key):
    # The defaults (224 px, the default class names) would load such a model wrongly, without a word.
    data = ChestXrayConfig(image_size=128, backbone="vgg19_bn").to_dict()
    del data[key]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"missing key\(s\) \['{key}'\]"):
        ChestXrayConfig.load(tmp_path / "config.json")


def test_a_saved_config_from_before_the_later_keys_still_loads_with_them_off(tmp_path):
    data = {"class_names": ["Normal", "Covid", "Viral Pneumonia"], "image_size": 128, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "backbone": "vgg19_bn", "hidden_size": 256, "dropout": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = ChestXrayConfig.load(tmp_path / "config.json")
    assert (config.image_size, config.contrast, config.feature_threshold) == (128, "none", 0.0)
