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
