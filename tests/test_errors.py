"""errors.py: every error the package raises on purpose is a ChestModelError, and stays the ValueError
or RuntimeError it was."""
import importlib
import inspect
import pkgutil

import pytest

import chest_model
from chest_model.errors import ChestModelError


def package_exception_classes() -> dict[str, type]:
    """Every exception class defined in a chest_model module (the Space's app template is not a module of it)."""
    found = {}
    for info in pkgutil.iter_modules(chest_model.__path__):
        if info.name in ("__main__", "space_app"):
            continue
        module = importlib.import_module(f"chest_model.{info.name}")
        for name, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = value
    return found


def test_every_exception_the_package_defines_is_a_chest_model_error():
    classes = package_exception_classes()
    assert classes.pop("runtime.Interrupted")  # control flow, not an error: the training loop catches it
    assert classes.pop("errors.ChestModelError") is ChestModelError
    assert {"config.ConfigError", "preprocess.ImageLoadError", "hub.ModelLoadError", "data.DatasetError",
            "precision.DeviceError", "explain.TargetClassError"} <= set(classes)
    assert len(classes) >= 11, sorted(classes)
    for name, cls in classes.items():
        assert issubclass(cls, ChestModelError), name
        assert issubclass(cls, (ValueError, RuntimeError)), f"{name} must stay the ValueError or RuntimeError it was"
    assert not issubclass(chest_model.runtime.Interrupted, ChestModelError)


def test_a_device_that_is_not_here_is_a_package_error():
    from chest_model.precision import inference_device

    for name in ("tpu:7", "cuda:99"):
        with pytest.raises(ChestModelError, match=repr(name)):
            inference_device(name)


def test_an_unknown_class_to_explain_is_a_package_error(tiny_model, xray_gray):
    from chest_model.explain import explain_image

    with pytest.raises(ChestModelError, match="'Pneumothorax' is not one of the model's classes"):
        explain_image(tiny_model, xray_gray, "Pneumothorax")


def test_an_unknown_precision_is_a_package_error(tiny_model, xray_gray):
    with pytest.raises(ChestModelError, match="precision must be"):
        tiny_model.predict(xray_gray, precision="fp8")
