"""The network and prediction (the backbone and the ImageNet factory: test_backbones.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from chest_model import ChestXrayClassifier
from helpers import EXAMPLES, synthetic_xray


def test_head_is_the_tutorials_and_forward_returns_logits():
    model = ChestXrayClassifier(hidden_size=256, dropout=0.3).eval()
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.head[2].in_features == 512 and model.head[2].out_features == 256 and model.head[5].out_features == 3
    assert not any(isinstance(m, (nn.Softmax, nn.Sigmoid, nn.LogSoftmax)) for m in model.modules())
    logits = model(torch.randn(2, 3, 64, 64) * 5)
    assert logits.shape == (2, 3)
    assert not torch.allclose(logits.sum(dim=1), torch.ones(2))  # not probabilities


def test_default_model_downloads_nothing(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("ChestXrayClassifier() must not download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    model = ChestXrayClassifier()
    assert model.config.class_names == ["Normal", "Covid", "Viral Pneumonia"]
    assert model.config.backbone_init == "random"


def test_predict_single_and_batch(tiny_model):
    images = [synthetic_xray(80, 70, seed=i, kind=i % 3) for i in range(5)]
    one = tiny_model.predict(images[0])
    assert isinstance(one, dict) and list(one) == tiny_model.class_names
    assert abs(sum(one.values()) - 1) < 1e-5
    many = tiny_model.predict(images, batch_size=2)
    assert isinstance(many, list) and len(many) == 5
    for a, b in zip(one.values(), many[0].values()):
        assert a == pytest.approx(b, abs=1e-5)
    assert tiny_model.predict([]) == []


def test_predict_uses_eval_mode_and_restores_the_previous_mode(tiny_model):
    image = synthetic_xray(64, 64)
    tiny_model.train()
    first = tiny_model.predict(image)
    second = tiny_model.predict(image)
    assert tiny_model.training, "predict must restore train mode"
    assert first == second, "dropout must be off inside predict"
    assert all(p.grad is None for p in tiny_model.parameters())


def test_predict_applies_temperature(tiny_model):
    image = synthetic_xray(64, 64)
    base = tiny_model.predict(image)
    tiny_model.config.temperature = 1000.0
    flat = tiny_model.predict(image)
    assert max(flat.values()) - min(flat.values()) < max(base.values()) - min(base.values()) + 1e-9
    assert all(abs(p - 1 / 3) < 1e-3 for p in flat.values())


def test_bf16_prediction_stays_close_to_fp32(tiny_model):
    image = synthetic_xray(64, 64)
    fp32 = tiny_model.predict(image)
    bf16 = tiny_model.predict(image, precision="bf16")
    assert max(fp32, key=fp32.get) == max(bf16, key=bf16.get)
    assert max(abs(fp32[k] - bf16[k]) for k in fp32) < 0.02


def test_predict_files(tiny_model):
    files = sorted(EXAMPLES.glob("*.jpeg"))
    assert len(files) == 3
    results = tiny_model.predict(files)
    assert all(abs(sum(r.values()) - 1) < 1e-5 for r in results)


@pytest.mark.dataset
def test_bf16_matches_fp32_on_real_xrays_with_the_starter_model():
    from helpers import DATASET, STARTER, requires_dataset  # noqa: F401

    if not (DATASET / "test").is_dir() or not (STARTER / "model.safetensors").exists():
        pytest.skip(f"needs the real dataset at {DATASET} and the starter model")
    model = ChestXrayClassifier.from_pretrained(STARTER)
    files = sorted((DATASET / "test").glob("*/*"))[::3]
    fp32 = model.predict(files)
    bf16 = model.predict(files, precision="bf16")
    for a, b in zip(fp32, bf16):
        assert max(a, key=a.get) == max(b, key=b.get)
        assert max(abs(a[k] - b[k]) for k in a) < 0.02


def test_predict_marks_non_xrays_uncertain(tiny_model):
    photo = np.zeros((120, 160, 3), np.uint8)
    photo[:60] = (90, 170, 235)
    photo[60:] = (50, 170, 60)
    result = tiny_model.predict(photo)
    assert result.uncertain and result.label == "uncertain" and "colour" in result.reasons[0]
    assert abs(sum(result.values()) - 1) < 1e-5  # still the probabilities, for inspection
    blank = tiny_model.predict(np.full((64, 64), 128, np.uint8))
    assert blank.uncertain and "blank" in blank.reasons[0]
    xray = tiny_model.predict(synthetic_xray(80, 80))
    assert not xray.uncertain and xray.label == max(xray, key=xray.get) and xray.reasons == []
    tiny_model.config.min_confidence = 0.99  # nothing a random model says is that confident
    assert "low confidence" in tiny_model.predict(synthetic_xray(80, 80)).reasons[0]
    assert tiny_model.analyze([synthetic_xray(64, 64)])[0]["uncertain"] is True


def test_the_preprocessor_follows_the_config_the_model_holds(tiny_model):
    import dataclasses

    image = tiny_model.preprocessor.load(synthetic_xray(100, 90))  # RGB uint8
    assert tiny_model.preprocessor(image).shape == (3, 32, 32)
    tiny_model.config = dataclasses.replace(tiny_model.config, image_size=48, mean=[0.5] * 3)  # a new config object
    assert tiny_model.preprocessor(image).shape == (3, 48, 48)
    assert tiny_model.preprocessor.mean.flatten().tolist() == [127.5] * 3


def _bn_model():
    torch.manual_seed(0)
    return ChestXrayClassifier(image_size=32, hidden_size=16, backbone="vgg19_bn")


def test_predict_restores_every_submodules_own_mode():
    model = _bn_model().train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in frozen:
        bn.eval()  # fine-tuning with frozen BatchNorm statistics
    model.predict(synthetic_xray(40, 40))
    assert model.training and not any(bn.training for bn in frozen) and model.head.training


def test_threads_predicting_at_once_on_a_training_model_all_run_in_eval_mode():
    from concurrent.futures import ThreadPoolExecutor

    model = _bn_model()
    image = synthetic_xray(40, 40, seed=2)
    expected = model.eval().predict(image)
    model.train()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: model.predict(image), range(12)))
    for result in results:  # no pass ran with dropout on or batch statistics because another one finished
        assert result == pytest.approx(expected, abs=1e-5)
    assert model.training


def test_a_model_cast_to_another_dtype_still_predicts(tiny_model):
    image = synthetic_xray(40, 40)
    expected = tiny_model.predict(image)
    for dtype in (torch.bfloat16, torch.float64):
        assert tiny_model.to(dtype).predict(image) == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_that_cannot_work_is_refused(tiny_model, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        tiny_model.predict([synthetic_xray(40, 40)], batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_model.predict_proba([synthetic_xray(40, 40)], batch_size=batch_size)


def test_one_image_or_many_means_the_same_in_every_method(tiny_model, tmp_path):
    import cv2

    path = tmp_path / "film.png"
    cv2.imwrite(str(path), synthetic_xray(40, 40))
    assert tiny_model.predict_proba(str(path)).shape == (1, 3)  # a path is one image, not its characters
    assert tiny_model.predict_proba(synthetic_xray(40, 40)).shape == (1, 3)  # an array is one image
    many = tiny_model.predict(x for x in [path, path])  # any iterable of images is many
    assert isinstance(many, list) and len(many) == 2


def test_a_bad_item_in_a_list_is_named_by_its_place(tiny_model):
    from chest_model import ImageLoadError

    items = [synthetic_xray(40, 40)] * 3 + [b"not an image"]
    with pytest.raises(ImageLoadError, match=r"^item 3 \(counting from 0\) of 4: <12 bytes>: not an image"):
        tiny_model.predict(items, batch_size=2)


def test_a_model_whose_output_is_not_a_number_says_uncertain_not_normal(tiny_model, xray_gray):
    import math

    with torch.no_grad():
        tiny_model.head[5].bias[0] = float("nan")
    result = tiny_model.predict(xray_gray)
    assert all(math.isnan(p) for p in result.values())
    assert result.uncertain and result.label == "uncertain"
    assert "not a number" in result.reasons[0]


@pytest.mark.parametrize("images, message", [(None, "got NoneType"), (5, "got int"),
                                              ({"a.png": 1}, "got dict: pass a list")])
def test_what_is_neither_an_image_nor_a_list_of_them_is_named(tiny_model, images, message):
    with pytest.raises(TypeError, match=f"expected an image .* or a list of them, {message}"):
        tiny_model.predict(images)


def test_a_printed_uncertain_prediction_says_so():
    from chest_model.model import Prediction

    assert repr(Prediction({"Normal": 0.9, "Covid": 0.1}, ["colour image"])).startswith("Prediction(label='uncertain'")


def test_overriding_the_input_of_a_calibrated_model_warns(tiny_model, tmp_path, caplog):

    tiny_model.config.temperature = 1.5
    tiny_model.save_pretrained(tmp_path / "m")
    ChestXrayClassifier.from_pretrained(tmp_path / "m", image_size=64)
    assert "overriding image_size changes what the model sees" in caplog.text
