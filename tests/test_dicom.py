"""DICOM decoding details that the corpus's cases do not reach."""
import numpy as np
import pytest

from chest_model import load_image
from corpus import dicom_bytes


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_one_wide_window_is_a_threshold_at_its_centre():
    # PS3.3 C.11.2.1.2's linear formula divides by (width - 1); the narrowest window thresholds,
    # without a division by zero (which gave NaN at the centre itself).
    pixels = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (40, 1))
    image = load_image(dicom_bytes(pixels, window=(2000.0, 1.0)))[:, :, 0]
    values = pixels.astype(float)
    assert set(np.unique(image)) == {0, 255}
    np.testing.assert_array_equal(image == 255, values > 2000 - 0.5)


def test_a_window_maps_its_range_onto_the_grey_levels():
    pixels = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (40, 1))
    image = load_image(dicom_bytes(pixels, window=(2000.0, 1001.0)))[:, :, 0]
    assert image[0, pixels[0] <= 1400].max() == 0 and image[0, pixels[0] >= 2600].min() == 255
    assert 100 < image[0, list(pixels[0]).index(2000)] < 155


def _with(data: bytes, **attributes) -> bytes:
    """A DICOM file with attributes set (an empty string: present but empty, as exported files often are)."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for name, value in attributes.items():
        setattr(ds, name, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


RAMP = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (40, 1))


@pytest.mark.parametrize("empty", [{"WindowCenter": "", "WindowWidth": ""}, {"WindowWidth": ""},
                                   {"RescaleSlope": "", "RescaleIntercept": ""}, {"NumberOfFrames": ""}])
def test_empty_display_attributes_count_as_absent(empty):
    plain = load_image(dicom_bytes(RAMP))
    np.testing.assert_array_equal(load_image(_with(dicom_bytes(RAMP), **empty)), plain)


def test_an_empty_slope_is_the_standards_one():
    data = _with(dicom_bytes(RAMP, slope=2.0, intercept=100.0), RescaleSlope="")
    np.testing.assert_array_equal(load_image(data), load_image(dicom_bytes(RAMP, slope=1.0, intercept=100.0)))


def _with_text(data: bytes, tag_and_vr: bytes, text: bytes) -> bytes:
    """``data`` with one DS/IS value overwritten in place by ``text`` (pydicom refuses to write it)."""
    raw = bytearray(data)
    at = raw.index(tag_and_vr) + 8  # explicit VR, short form: tag (4), VR (2), length (2)
    raw[at : at + len(text)] = text
    return bytes(raw)


@pytest.mark.parametrize("attributes, tag_and_vr, text, message", [
    ({"WindowCenter": "2048", "WindowWidth": "4096"}, b"\x28\x00\x50\x10DS", b"abc ", "invalid DICOM display attributes"),
    ({"NumberOfFrames": "1"}, b"\x28\x00\x08\x00IS", b"x ", "invalid DICOM NumberOfFrames"),
])
def test_malformed_display_attributes_are_an_image_load_error_naming_the_file(tmp_path, attributes, tag_and_vr, text, message):
    from chest_model import ImageLoadError

    path = tmp_path / "scan.dcm"
    path.write_bytes(_with_text(_with(dicom_bytes(RAMP), **attributes), tag_and_vr, text))
    with pytest.raises(ImageLoadError, match=f"scan.dcm: {message}"):
        load_image(path)


def test_a_dicom_file_without_its_preamble_is_read_and_found_in_folders(tmp_path):
    import io

    import pydicom

    from chest_model.data import is_image_file

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(RAMP)))
    ds.preamble = None
    del ds.file_meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert buffer.getvalue()[128:132] != b"DICM"  # older exports: the dataset alone, from its first tag
    bare = tmp_path / "IMG0001"
    bare.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(load_image(bare), load_image(dicom_bytes(RAMP)))
    assert is_image_file(bare)


def test_a_palette_colour_file_shows_its_palette_not_its_indices():
    import io

    import pydicom

    indices = (np.indices((40, 40)).sum(0) * 3).astype(np.uint8)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(indices)))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = indices.tobytes()
    inverting = ((255 - np.arange(256)) * 257).astype("<u2").tobytes()
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", inverting)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    image = load_image(buffer.getvalue())[:, :, 0].astype(float)
    assert np.corrcoef(image.ravel(), indices.ravel())[0, 1] < -0.99


def test_an_empty_rescale_pair_beside_a_window_is_absent():
    windowed = dicom_bytes(RAMP, window=(2000.0, 1001.0))
    np.testing.assert_array_equal(load_image(_with(windowed, RescaleSlope="", RescaleIntercept="")), load_image(windowed))


def test_twelve_bit_data_declared_as_sixteen_stored_bits_is_shown_as_twelve_bit_data():
    # Exported films often declare BitsStored 16 for 12-bit detector values; scaled by the declared
    # depth they came out almost black (0..16 of 255) and the film was flagged "blank".
    declared_12 = load_image(dicom_bytes(RAMP))
    declared_16 = load_image(_with(dicom_bytes(RAMP), BitsStored=16, HighBit=15))
    np.testing.assert_array_equal(declared_16, declared_12)
    assert declared_16.max() > 200
    # A depth below the container is the header's word: one brighter pixel does not rescale the film.
    dark, bright = RAMP.copy() // 2, RAMP.copy() // 2
    bright[0, 0] = 2048  # 2047 -> 2048: one more bit used, still 12 declared
    np.testing.assert_array_equal(load_image(dicom_bytes(dark))[1:], load_image(dicom_bytes(bright))[1:])


def test_float_pixel_data_is_named_not_called_missing():
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(RAMP)))
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = RAMP.astype(np.float32).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ValueError, match="film.dcm: DICOM float pixel data .* is not supported"):
        load_image(buffer.getvalue(), name="film.dcm")
