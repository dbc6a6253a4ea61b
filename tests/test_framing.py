"""The framing and tone checks: films cropped around their centre, or through another gamma curve, and classified again."""
import numpy as np
import pytest

from chest_model.framing import FRAMINGS, TONES, centre_crop, framing_check, framing_lines, tone_check, tone_curve
from chest_model import load_image
from helpers import synthetic_xray, write_image


def test_centre_crop_keeps_the_centre_of_a_non_square_film():
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 90:110] = 255  # a mark in the middle
    for _, keep_width, keep_height in FRAMINGS:
        crop = centre_crop(image, keep_width, keep_height)
        assert crop.shape == (round(100 * keep_height), round(200 * keep_width), 3)
        h, w = crop.shape[:2]
        assert crop[h // 2, w // 2].tolist() == [255, 255, 255]
        assert crop.sum() == image.sum()  # the mark is whole in every framing
    assert centre_crop(image, 0.5, 1.0).shape == (100, 100, 3)
    # Never below the smallest film the model accepts: a small film is cropped less, or not at all.
    assert centre_crop(image, 0.2, 0.2, min_side=32).shape == (32, 40, 3)
    assert centre_crop(image[:20], 0.5, 0.5, min_side=32).shape == (20, 100, 3)


def test_framing_check_reports_each_group_and_framing(tiny_model):
    images = [np.repeat(synthetic_xray(64, 80, seed=i, kind=i % 3)[..., None], 3, axis=2) for i in range(9)]
    groups = ["a / Normal"] * 4 + ["b / Normal"] * 5
    check = framing_check(tiny_model, images, groups, batch_size=4)
    assert check["framings"] == [name for name, _, _ in FRAMINGS]
    assert list(check["groups"]) == ["a / Normal", "b / Normal"]
    assert [row["n"] for row in check["groups"].values()] == [4, 5]

    # "as given" is exactly the model's own answer on the uncropped films.
    top = tiny_model.predict_proba(images).argmax(dim=1).numpy()
    for group, mask in (("a / Normal", slice(0, 4)), ("b / Normal", slice(4, 9))):
        cells = check["groups"][group]["framings"]
        as_given = cells["as given"]
        assert as_given["changed"] == 0
        for c, name in enumerate(tiny_model.class_names):
            assert as_given["called"][name] == pytest.approx(float((top[mask] == c).mean()))
        for cell in cells.values():
            assert sum(cell["called"].values()) == pytest.approx(1)
            # A share can only move as far as the films whose answer changed.
            moved = sum(abs(cell["called"][k] - as_given["called"][k]) for k in as_given["called"]) / 2
            assert moved <= cell["changed"] + 1e-9
    lines = framing_lines(check, tiny_model.class_names)
    assert "b / Normal (5 films)" in "\n".join(lines) and len(lines) == 2 + 2 * (1 + len(FRAMINGS))


def test_framing_check_needs_a_group_per_image(tiny_model):
    with pytest.raises(ValueError, match="2 images but 1 group"):
        framing_check(tiny_model, [np.zeros((8, 8, 3), np.uint8)] * 2, ["x"])


def test_tone_curve_keeps_black_white_and_order_and_moves_the_mid_greys():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lighter, darker = tone_curve(levels, 0.7), tone_curve(levels, 1.4)
    for curve in (lighter, darker):
        assert curve[0, 0] == 0 and curve[-1, -1] == 255
        assert (np.diff(curve.ravel().astype(int)) >= 0).all()  # a look-up table: the order of the levels stays
    assert lighter[8, 0] > 128 > darker[8, 0]  # level 128


def test_tone_check_reports_each_group_and_curve_with_the_models_own_answer_as_given(tiny_model):
    images = [np.repeat(synthetic_xray(64, 80, seed=i, kind=i % 3)[..., None], 3, axis=2) for i in range(6)]
    groups = ["a / Normal"] * 2 + ["b / Covid"] * 4
    check = tone_check(tiny_model, images, groups, batch_size=4)
    assert check["tones"] == [name for name, _ in TONES] and list(check["groups"]) == ["a / Normal", "b / Covid"]
    top = tiny_model.predict_proba(images).argmax(dim=1).numpy()
    darker = tiny_model.predict_proba([tone_curve(image, 1.4) for image in images]).argmax(dim=1).numpy()
    cells = check["groups"]["b / Covid"]["tones"]
    assert cells["as given"]["changed"] == 0
    assert cells["gamma 1.4 (mid-greys darker)"]["changed"] == pytest.approx(float((darker[2:] != top[2:]).mean()))
    for c, name in enumerate(tiny_model.class_names):
        assert cells["as given"]["called"][name] == pytest.approx(float((top[2:] == c).mean()))
    lines = framing_lines(check, tiny_model.class_names)
    assert lines[0].startswith("tone check") and len(lines) == 2 + 2 * (1 + len(TONES))


def test_the_film_as_given_is_read_as_the_model_reads_it(tiny_model, tmp_path, monkeypatch):
    # The crops need a larger JPEG decode than the model's own (1/4 scale here, not 1/8); "as given" must not.
    path = write_image(tmp_path / "film.jpg", synthetic_xray(300, 360, seed=1))
    seen = []
    infer = tiny_model.infer
    monkeypatch.setattr(tiny_model, "infer", lambda images, **kw: (seen.append(images), infer(images, **kw))[1])
    framing_check(tiny_model, [str(path)], ["g"])
    own = load_image(path, min_size=tiny_model.config.image_size)
    np.testing.assert_array_equal(seen[0][0], own)
    assert seen[1][0].shape[0] > own.shape[0]  # the crops come from the larger decode


def test_files_given_as_open_streams_are_read_once_and_checked_like_paths(tiny_model, tmp_path):
    path = write_image(tmp_path / "film.jpg", synthetic_xray(300, 360, seed=1))
    by_path = framing_check(tiny_model, [str(path)], ["g"])
    with open(path, "rb") as stream:
        assert framing_check(tiny_model, [stream], ["g"]) == by_path
