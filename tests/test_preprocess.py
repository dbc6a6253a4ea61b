"""load_image and the Preprocessor: every supported input, every failure, on real encoded files."""
import io
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from chest_model import ChestXrayConfig, ImageLoadError, Preprocessor, load_image
from chest_model.preprocess import MAX_PIXELS
from helpers import DATASET, EXAMPLES, requires_dataset, synthetic_xray, write_image
from corpus import bad_cases, base_xray, valid_cases

VALID = valid_cases()
BAD = bad_cases()


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_every_supported_encoding_decodes_to_the_same_picture(case, tmp_path):
    path = tmp_path / case.name
    path.write_bytes(case.data)
    image = load_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == base_xray().shape, "EXIF orientation must be applied"
    gray = image.astype(np.float64).mean(axis=2)
    assert np.abs(gray - base_xray()).mean() < 3.0  # lossless formats ~0; JPEG ~1.5


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_every_bad_input_raises_a_clear_error_naming_the_file(case, tmp_path):
    path = tmp_path / case.name
    path.write_bytes(case.data)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message
    assert case.error.lower() in message.lower()


def test_image_load_error_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)


def test_decompression_bomb_is_refused_from_the_header_fast():
    bomb = next(c for c in BAD if c.name == "bomb.png")
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(bomb.data, name="bomb.png")
    assert time.perf_counter() - start < 1.0
    assert 100_000 * 100_000 > MAX_PIXELS > 50_000_000  # well above any real radiograph


def test_sources_path_str_bytes_fileobj_give_identical_arrays(tmp_path):
    data = next(c for c in VALID if c.name == "gray.png").data
    path = tmp_path / "x.png"
    path.write_bytes(data)
    results = [load_image(path), load_image(str(path)), load_image(data), load_image(io.BytesIO(data)), load_image(bytearray(data))]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_file_object_name_is_used_in_errors(tmp_path):
    path = tmp_path / "named.png"
    path.write_bytes(b"")
    with open(path, "rb") as handle, pytest.raises(ImageLoadError, match="named.png: empty file"):
        load_image(handle)


def test_a_file_object_read_to_its_end_is_named_as_such_not_called_empty(tmp_path):
    path = write_image(tmp_path / "film.png", synthetic_xray(64, 64))
    with open(path, "rb") as handle:
        load_image(handle)  # the first read takes every byte
        with pytest.raises(ImageLoadError, match=r"film.png: nothing left to read: the file object is at byte \d+, its end .*seek\(0\)"):
            load_image(handle)
        handle.seek(0)
        assert load_image(handle).shape == (64, 64, 3)


def test_a_pil_image_whose_file_is_closed_is_an_image_load_error(tmp_path):
    path = write_image(tmp_path / "film.png", synthetic_xray(64, 64))
    with Image.open(path) as image:
        pass  # closed before it was ever loaded
    with pytest.raises(ImageLoadError, match=r"the PIL image cannot be read \((?!\)).+\)"):  # says why
        load_image(image)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="unsupported input type"):
        load_image(12345)


@pytest.mark.parametrize(
    "array",
    [
        base_xray(),
        base_xray()[:, :, None],
        np.dstack([base_xray()] * 3),
        np.dstack([base_xray()] * 3 + [np.zeros_like(base_xray())]),
        base_xray().astype(np.float32) / 255,
        base_xray().astype(np.float64) / 255,
        base_xray().astype(np.uint16) * 257,
    ],
    ids=["HxW", "HxWx1", "HxWx3", "HxWx4", "float32", "float64", "uint16"],
)
def test_numpy_arrays(array):
    image = load_image(array)
    assert image.shape == base_xray().shape + (3,)
    assert np.abs(image[:, :, 0].astype(int) - base_xray()).max() <= 1


def test_16_bit_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 4095, 256).astype(np.uint16), (64, 1))  # 12-bit data in 16-bit
    image = load_image(ramp)[:, :, 0]
    assert image.max() == 255 and image.min() == 0
    assert len(np.unique(image)) > 200, "levels must be spread over 0..255, not crushed or clipped"
    full = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    image = load_image(full)[:, :, 0]
    assert image.max() == 255 and (image == 255).mean() < 0.01


def test_16_bit_png_file_round_trip(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (40, 1))
    cv2.imwrite(str(tmp_path / "r.png"), ramp)
    image = load_image(tmp_path / "r.png")[:, :, 0]
    np.testing.assert_allclose(image.astype(float), ramp / 257.0, atol=0.51)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((64, 64), np.nan, np.float32), "NaN or inf"),
        (np.full((64, 64), np.inf), "NaN or inf"),
        (np.full((64, 64), 2.0), r"\[0, 1\]"),
        (np.zeros((64, 64, 2), np.uint8), "shape"),
        (np.zeros((2, 64, 64, 3), np.uint8), "shape"),
        (np.zeros((0, 64), np.uint8), "empty"),
        (np.zeros((8, 64), np.uint8), "too small"),
        (np.full((64, 64), -5, np.int16), "negative"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(array)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_pil_images(mode):
    gray = base_xray()
    if mode == "I;16":
        pil = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        pil = Image.fromarray(gray).convert(mode)
    image = load_image(pil)
    assert image.shape == gray.shape + (3,)
    assert np.abs(image.astype(float).mean(axis=2) - gray).mean() < 2


def test_reduced_jpeg_decode_keeps_at_least_min_size(tmp_path):
    big = cv2.resize(base_xray(), (1600, 2000), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(tmp_path / "big.jpg"), big)
    full = load_image(tmp_path / "big.jpg")
    reduced = load_image(tmp_path / "big.jpg", min_size=224)
    assert full.shape[:2] == (2000, 1600)
    assert reduced.shape[:2] == (500, 400)  # 1/4, the smallest DCT scale that keeps 224 px (1/8 would give 250x200)
    assert min(reduced.shape[:2]) >= 224 and reduced.shape[0] < full.shape[0]
    pre = Preprocessor(ChestXrayConfig(image_size=224))
    a, b = pre(full), pre(reduced)
    assert (a - b).abs().mean() < 0.05  # same model input, a fraction of the decode work


def test_preprocessor_uses_config_size_and_normalization():
    config = ChestXrayConfig(image_size=48, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0])
    pre = Preprocessor(config)
    white = np.full((100, 80, 3), 255, np.uint8)
    x = pre(white)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    assert pre.resize(white).dtype == np.uint8  # resize happens on uint8
    with pytest.raises(TypeError):
        pre.normalize(torch.zeros(3, 48, 48))


def test_normalization_constants_live_only_in_the_config():
    package = Path(__file__).resolve().parents[1] / "chest_model"
    offenders = [p.name for p in package.glob("*.py") if p.name != "config.py" and ("0.485" in p.read_text() or "0.229" in p.read_text())]
    assert offenders == []


def test_shipped_examples_decode():
    for path in sorted(EXAMPLES.glob("*.jpeg")):
        image = load_image(path)
        assert max(image.shape[:2]) <= 512 and image.dtype == np.uint8


@requires_dataset()
def test_real_dataset_files_decode_with_reduced_size():
    files = sorted((DATASET / "test").glob("*/*"))
    assert len(files) == 66
    for path in files[::6]:
        image = load_image(path, min_size=224)
        assert min(image.shape[:2]) >= 224 or min(load_image(path).shape[:2]) < 448


def test_reading_headers_from_many_threads_leaves_pils_own_limit_in_place(tmp_path):
    """The header reader lifts PIL's decompression-bomb limit while it reads; threads must not leave it lifted."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from chest_model.preprocess import header_size

    limit = Image.MAX_IMAGE_PIXELS
    data = cv2.imencode(".png", synthetic_xray(64, 48))[1].tobytes()
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: header_size(data, "PNG", "x.png"), range(2000)))
    assert set(sizes) == {(48, 64)} and Image.MAX_IMAGE_PIXELS == limit


def _tone_curves(image: np.ndarray) -> dict[str, np.ndarray]:
    """The same film as other detectors' look-up tables would render it (monotone grey-level maps). Kept
    moderate: a steep curve merges 8-bit levels, and no normalisation can part levels the file merged."""
    levels = np.arange(256) / 255.0
    curves = {"gamma 0.7": levels ** 0.7, "gamma 1.3": levels ** 1.3,
              "S-curve": 0.5 * levels + 0.5 * (0.5 - 0.5 * np.cos(np.pi * levels))}
    return {name: np.rint(255 * curve).astype(np.uint8)[image] for name, curve in curves.items()}


def test_contrast_standardize_gives_every_film_the_same_mean_and_spread():
    from chest_model.preprocess import STANDARD_MEAN, STANDARD_STD

    pre = Preprocessor(ChestXrayConfig(image_size=128, contrast="standardize"))
    for path in sorted(EXAMPLES.glob("*.jpeg")):
        for image in (load_image(path), *_tone_curves(load_image(path)).values()):
            grey = pre.to_uint8_tensor(image)[0].float()
            assert abs(grey.mean().item() - STANDARD_MEAN) < 2 and abs(grey.std().item() - STANDARD_STD) < 3, path


def test_contrast_equalize_takes_away_the_tone_curve_that_standardize_leaves():
    """Equalisation ranks the grey levels: a film rendered through another monotone curve gives the same input."""
    for path in sorted(EXAMPLES.glob("*.jpeg")):
        film = load_image(path)
        for mode, most in (("equalize", 1.5), ("standardize", None)):
            pre = Preprocessor(ChestXrayConfig(image_size=128, contrast=mode))
            reference = pre.to_uint8_tensor(film).float()
            for name, rendered in _tone_curves(film).items():
                difference = (pre.to_uint8_tensor(rendered).float() - reference).abs().mean().item()
                if most is not None:
                    assert difference < most, (path.name, mode, name, difference)
                else:  # the control: standardising alone leaves the curve visible, so the check above can fail
                    assert difference > 2, (path.name, mode, name, difference)
        # and the equalised film uses the whole grey range with an even histogram
        grey = Preprocessor(ChestXrayConfig(image_size=128, contrast="equalize")).to_uint8_tensor(film)[0].numpy()
        assert grey.min() < 10 and grey.max() == 255
        quartiles = np.percentile(grey, [25, 50, 75])
        np.testing.assert_allclose(quartiles, [64, 128, 191], atol=20, err_msg=path.name)


@pytest.mark.parametrize("mode", ["standardize", "clahe", "equalize"])
def test_contrast_modes_give_grey_rgb_and_leave_a_blank_image_blank(mode):
    pre = Preprocessor(ChestXrayConfig(image_size=64, contrast=mode))
    film = load_image(sorted(EXAMPLES.glob("*.jpeg"))[0])
    colour = film.copy()
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + 40, 0, 255)
    out = pre.to_uint8_tensor(colour)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # the model sees grey, as it trained
    blank = pre.to_uint8_tensor(np.full((100, 100, 3), 90, np.uint8))[0]
    assert int(blank.max()) - int(blank.min()) == 0  # no noise invented where there is no picture


def test_8_bit_levels_stored_in_16_bits_come_back_exactly_over_many_row_bands():
    levels = np.arange(256, dtype=np.uint16)
    tall = np.tile(levels * 257, (20000, 1))  # taller than one band of rows of the scaling
    np.testing.assert_array_equal(load_image(tall)[:, :, 0], np.tile(levels.astype(np.uint8), (20000, 1)))


def test_bigtiff_is_read(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="tifffile writes BigTIFF (it comes with scikit-image)")
    tifffile.imwrite(tmp_path / "film.tif", base_xray(), bigtiff=True)
    assert (tmp_path / "film.tif").read_bytes()[:4] == b"II+\x00"
    np.testing.assert_array_equal(load_image(tmp_path / "film.tif")[:, :, 0], base_xray())


def test_what_cannot_be_read_is_an_image_load_error_naming_it(tmp_path):
    good = tmp_path / "film.png"
    cv2.imwrite(str(good), base_xray())
    with open(good, encoding="utf-8", errors="strict") as text:
        with pytest.raises(ImageLoadError, match="open in text mode; open it with 'rb'"):
            load_image(text)
    handle = open(good, "rb")
    handle.close()
    with pytest.raises(ImageLoadError, match="film.png: cannot read the file object"):
        load_image(handle)
    closed = Image.open(good)
    closed.close()
    with pytest.raises(ImageLoadError, match="PIL image cannot be read"):
        load_image(closed)
    truncated = tmp_path / "cut.jpg"
    cv2.imwrite(str(truncated), base_xray())
    truncated.write_bytes(truncated.read_bytes()[:-400])
    with pytest.raises(ImageLoadError, match="PIL image cannot be read .*truncated"):
        load_image(Image.open(truncated))  # PIL opens lazily: the damage shows when the pixels are read
    with pytest.raises(ImageLoadError, match="cannot read file .File name too long"):
        load_image(tmp_path / ("x" * 300 + ".png"))
    with pytest.raises(ImageLoadError, match="empty path"):
        load_image("")


def test_a_pil_image_opened_from_a_file_is_read_as_that_file(tmp_path):
    """Lazily opened, it is still its file: the same pixels as the path (a JPEG at the reduced scale
    training used, a 16-bit colour PNG scaled to its bit depth), and the caller's image is left as it was."""
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.integers(0, 256, (1100, 900), dtype=np.uint8), (0, 0), 3)
    jpeg = write_image(tmp_path / "big.jpg", big)
    twelve_bit = (rng.integers(0, 4096, (80, 70, 3))).astype(np.uint16)  # 12-bit data in a 16-bit colour PNG
    png = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(png), twelve_bit)
    for path in (jpeg, png):
        expected = load_image(path, min_size=128)
        image = Image.open(path)
        size = image.size
        np.testing.assert_array_equal(load_image(image, min_size=128), expected)
        with open(path, "rb") as handle:
            np.testing.assert_array_equal(load_image(Image.open(handle), min_size=128), expected)
        np.testing.assert_array_equal(load_image(Image.open(io.BytesIO(path.read_bytes())), min_size=128), expected)
        assert image.size == size and np.asarray(image).shape[:2] == size[::-1]  # still loads in full
    # Read through the image's own open file: a file replaced on disk since does not change it.
    opened = Image.open(jpeg)
    expected = load_image(jpeg, min_size=128)
    replacement = write_image(tmp_path / "other.jpg", np.full((1100, 900), 30, np.uint8))
    replacement.replace(jpeg)
    np.testing.assert_array_equal(load_image(opened, min_size=128), expected)
    # Once loaded (or changed), a PIL image is its pixels, used in full like an array.
    loaded = Image.open(jpeg)
    loaded.load()
    np.testing.assert_array_equal(load_image(loaded, min_size=128), load_image(np.asarray(loaded)))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_colour_files_decode_as_rgb_like_every_other_input(tmp_path, suffix):
    """Arrays and PIL images are read as RGB; a file must come out the same way round, not as OpenCV's BGR."""
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0] = 220  # red
    rgb[..., 2] = 30
    path = tmp_path / f"red{suffix}"
    Image.fromarray(rgb).save(path, quality=95)  # PNG ignores the quality
    from_file = load_image(path)
    assert from_file[..., 0].mean() > 180 and from_file[..., 2].mean() < 70
    with open(path, "rb") as handle:
        assert np.abs(load_image(handle).astype(int) - from_file).max() == 0
    assert np.abs(load_image(Image.open(path)).astype(int) - from_file).max() <= 3  # PIL's decoder, not OpenCV's
