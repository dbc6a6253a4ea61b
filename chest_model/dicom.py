"""DICOM decoding with pydicom: modality LUT, VOI LUT or window, MONOCHROME1 inversion."""
from __future__ import annotations

import io
import warnings

import numpy as np


def decode_dicom(data: bytes, label: str, *, max_pixels: int, error: type[Exception]) -> np.ndarray:
    """Return a single-frame DICOM image as ``uint8`` (H×W grayscale or H×W×3 RGB)."""
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the decoders, needed below
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        raise error(f"{label}: is DICOM, but pydicom is not installed (pip install pydicom)") from None

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity of a broken header
            # force: files without the 128-byte preamble (recognised by their first tag) are DICOM too
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        raise error(f"{label}: corrupt DICOM file ({err})") from None
    if not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        # A bare dataset (no file meta): its encoding is what pydicom read it as, implicit VR by default.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit is not False else
                                          ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    if "PixelData" not in ds and ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        raise error(f"{label}: DICOM float pixel data (a parametric map) is not supported; "
                    "X-ray films store integer pixel data")
    if "PixelData" not in ds:
        raise error(f"{label}: DICOM file has no pixel data (a report or structured document, "
                    "or a file cut off before its pixels)")
    try:
        frames = int(_present(ds, "NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise error(f"{label}: invalid DICOM NumberOfFrames {ds.get('NumberOfFrames')!r}") from None
    if frames > 1:
        raise error(f"{label}: multi-frame DICOM ({frames} frames) is not supported; export a single frame")
    try:
        rows, cols = int(_present(ds, "Rows") or 0), int(_present(ds, "Columns") or 0)
    except (TypeError, ValueError):
        raise error(f"{label}: invalid DICOM Rows/Columns") from None
    if rows * cols > max_pixels:
        raise error(f"{label}: too many pixels: DICOM header declares {cols}x{rows}, over the {max_pixels / 1e6:.0f} MP limit")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise error(
                f"{label}: unsupported DICOM transfer syntax '{name}': no decoder installed for it "
                f"(install pylibjpeg with its plugins, or decompress the file) [{err}]"
            ) from None
        raise error(f"{label}: cannot read DICOM pixel data ({err})") from None

    try:
        return _display(ds, pixels, label, error)
    except Exception as err:  # noqa: BLE001 - a malformed window, LUT or rescale attribute
        if isinstance(err, error):
            raise
        raise error(f"{label}: invalid DICOM display attributes (window, LUT or rescale): {err}") from None


def _display(ds, pixels: np.ndarray, label: str, error: type[Exception]) -> np.ndarray:
    """The stored values as the grey levels a viewer shows (uint8), or RGB for colour files."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(_present(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        pixels = apply_color_lut(pixels, ds)  # the stored values are indices into the palette
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return _scale_to_uint8(pixels.astype(np.float64))  # colour DICOM (secondary capture)
    if pixels.ndim != 2:
        raise error(f"{label}: unexpected DICOM pixel array shape {pixels.shape}")

    # Empty attributes are common in exported files: they count as absent; one of the rescale pair
    # empty takes the standard's value (slope 1, intercept 0), on every path below.
    rescale = ("RescaleSlope", "RescaleIntercept")
    if _present(ds, "ModalityLUTSequence") is None and any(_present(ds, name) is not None for name in rescale):
        ds.RescaleSlope = _present(ds, "RescaleSlope") or 1
        ds.RescaleIntercept = _present(ds, "RescaleIntercept") or 0
    else:
        for name in rescale:
            if name in ds and _present(ds, name) is None:
                delattr(ds, name)
    if _present(ds, "WindowCenter") is not None and _present(ds, "WindowWidth") is not None:
        image = _window(apply_modality_lut(pixels, ds).astype(np.float64), ds)
    elif _present(ds, "VOILUTSequence") is not None:
        image = _scale_to_uint8(apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64))
    elif any(_present(ds, name) is not None for name in (*rescale, "ModalityLUTSequence")):
        image = _scale_to_uint8(apply_modality_lut(pixels, ds).astype(np.float64))
    else:
        # Raw detector values, scaled by the stored bit depth. A file that declares its whole container
        # (16 stored of 16 allocated) often holds 12-bit data, which scaled by 16 bits shows almost
        # black: there, as for a 16-bit PNG, the bits its values use. A smaller declared depth is trusted.
        bits = int(_present(ds, "BitsStored") or pixels.dtype.itemsize * 8)
        signed = int(_present(ds, "PixelRepresentation") or 0)
        whole_container = bits >= int(_present(ds, "BitsAllocated") or pixels.dtype.itemsize * 8)
        if whole_container and not signed and pixels.size:
            bits = min(bits, max(8, int(pixels.max()).bit_length()))
        low = -(1 << (bits - 1)) if signed else 0
        image = np.rint((pixels.astype(np.float64) - low) * (255.0 / ((1 << bits) - 1))).clip(0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1 stores bright as low values
    return image


def _present(ds, name: str):
    """An attribute's value, or None where it is missing or empty."""
    value = ds.get(name)  # by keyword: the value itself
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return None
    return value


def _first(value) -> float:
    return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)


def _window(image: np.ndarray, ds) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window: the window's range maps onto 0..255."""
    center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
    if width <= 1:  # the standard's smallest window is a threshold at the centre (its formula divides by w - 1)
        return np.where(image > center - 0.5, 255, 0).astype(np.uint8)
    scaled = ((image - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return np.rint(scaled * 255).astype(np.uint8)


def _scale_to_uint8(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.rint((image - lo) * (255.0 / (hi - lo))).astype(np.uint8)
