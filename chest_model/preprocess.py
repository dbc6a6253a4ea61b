"""The one preprocessing path: any image source -> RGB uint8 array -> normalized tensor.

``load_image`` decodes with OpenCV (pydicom for DICOM) and turns every supported input into an
``(H, W, 3)`` RGB ``uint8`` array, or raises :class:`ImageLoadError` naming the source and the problem.
:class:`Preprocessor`, built from a model's config, resizes that array and normalizes it. Training,
evaluation, ``predict``, the CLI and the demo all go through these two pieces.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Union

import cv2
import numpy as np
import torch

from .config import MIN_IMAGE_SIZE, ChestXrayConfig
from .errors import ChestModelError

logger = logging.getLogger(__name__)

# The largest radiographs are ~40 MP; anything past this is a decompression bomb, not an X-ray.
MAX_PIXELS = 200_000_000
MIN_SIDE = MIN_IMAGE_SIZE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".gif", ".webp")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, Any]

cv2.setNumThreads(1)  # decoding runs in worker threads; OpenCV's own pool would oversubscribe
try:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:  # pragma: no cover - older OpenCV builds
    pass


class ImageLoadError(ChestModelError, ValueError):
    """An input that cannot be turned into an X-ray image; the message names the source and why."""


# ---------------------------------------------------------------------------------------------
# Decoding


def load_image(source: ImageSource, *, name: str | None = None, min_size: int | None = None) -> np.ndarray:
    """Decode ``source`` into an RGB ``uint8`` array of shape ``(H, W, 3)``.

    ``source`` may be a path, bytes, a binary file object, a numpy array (H×W, H×W×1/3/4; uint8,
    uint16 or float in [0, 1]; channels in RGB order) or a PIL image. ``name`` is used in error
    messages instead of the default description of the source.

    ``min_size``: when set, JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as
    long as both sides stay at least ``min_size`` pixels. A 224-px model loses nothing and a 10 MP
    file decodes several times faster. Other formats decode at full size. A PIL image opened from a file and not
    yet loaded is decoded from that file, as its path is; an array or a loaded PIL image is used as given.
    """
    label = name or _describe(source)
    if isinstance(source, np.ndarray):
        return _finish(_array_to_rgb(source, label), label)
    if is_pil_image(source):
        unread = _unread_bytes_of(source)
        if unread is not None:
            # Still exactly its file: decode the file as its path would be (JPEG at the reduced scale
            # training used, 16-bit colour PNG scaled, TIFF orientation), so both give one answer.
            try:
                return _finish(_decode_bytes(unread, label, min_size), label)
            except ImageLoadError:
                pass  # a file only PIL can read: converted below, as any PIL image is
        try:
            return _finish(_pil_to_rgb(source, label), label)
        except (OSError, ValueError, AssertionError) as err:  # a lazily opened file that is truncated, or already closed
            if isinstance(err, ImageLoadError):
                raise
            raise ImageLoadError(f"{label}: the PIL image cannot be read ({str(err) or 'its file is already closed'})") from None
    data = _read_bytes(source, label)
    return _finish(_decode_bytes(data, label, min_size), label)


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if is_pil_image(source):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def is_pil_image(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("PIL.") and hasattr(obj, "mode") and hasattr(obj, "size")


def _unread_bytes_of(image: Any) -> bytes | None:
    """The bytes of the file a PIL image was opened from, while the image is still that file as
    stored: opened lazily and not yet loaded, drafted or moved to another frame (anything done to its
    pixels loads it). Read through the image's own open file, which is what PIL itself would decode."""
    handle = getattr(image, "fp", None)
    if handle is None or not getattr(image, "tile", None) or getattr(image, "decoderconfig", None) or image.tell() != 0:
        return None  # closed, loaded, drafted or on another frame: its pixels are what it is now
    try:
        position = handle.tell()
        try:
            handle.seek(0)  # PIL reads an image from the start of the file it is given
            data = handle.read()
        finally:
            handle.seek(position)
    except (OSError, ValueError, AttributeError):
        return None
    return data if isinstance(data, bytes) and data else None


def _read_bytes(source: Any, label: str) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        if os.fspath(source) == "":  # an unset shell variable: Path("") would be the working folder
            raise ImageLoadError("empty path: name an image file")
        path = Path(source)
        try:
            if path.is_dir():
                raise ImageLoadError(f"{label}: is a directory, not an image file")
            data = path.read_bytes()
        except FileNotFoundError:
            broken = " (a symbolic link to a file that is not there)" if path.is_symlink() else ""
            raise ImageLoadError(f"{label}: no such file{broken}") from None
        except OSError as err:  # no permission, a name too long...
            raise ImageLoadError(f"{label}: cannot read file ({err.strerror or err})") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        try:
            start = source.tell() if getattr(source, "seekable", lambda: False)() else None
        except (OSError, ValueError):
            start = None
        try:
            data = source.read()
        except UnicodeDecodeError:
            raise ImageLoadError(f"{label}: file object is open in text mode; open it with 'rb'") from None
        except (OSError, ValueError) as err:  # a closed file, a failing stream
            raise ImageLoadError(f"{label}: cannot read the file object ({err})") from None
        if isinstance(data, str):
            raise ImageLoadError(f"{label}: file object is open in text mode; open it with 'rb'")
        if not data and start:  # read before, by us or the caller: say so rather than "empty file"
            raise ImageLoadError(f"{label}: nothing left to read: the file object is at byte {start}, its end "
                                 "(already read?); call .seek(0) on it first")
    else:
        raise ImageLoadError(
            f"{label}: unsupported input type {type(source).__name__}; "
            "expected a path, bytes, a binary file object, a numpy array or a PIL image"
        )
    if len(data) == 0:
        raise ImageLoadError(f"{label}: empty file (0 bytes)")
    return data


def sniff_format(data: bytes) -> str | None:
    """The image format from the file's magic bytes, or None when it is not an image we read."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        # No preamble (older exports, ACR-NEMA): the file starts with a little-endian group 0002 or 0008 tag.
        return "DICOM"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic TIFF and BigTIFF
        return "TIFF"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


SNIFF_BYTES = 132  # enough for every signature above (DICOM's "DICM" ends at byte 132)


def file_format(path: str | os.PathLike) -> str | None:
    """:func:`sniff_format` of a file's first bytes; None also when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return sniff_format(handle.read(SNIFF_BYTES))
    except OSError:
        return None


def _what_is_it(data: bytes) -> str:
    """A short guess of what a non-image file is, for the error message."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"%pdf"):
        return "a PDF document"
    if data[:4] == b"PK\x03\x04":
        return "a ZIP archive (or a zipped office document)"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "an HTML page"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "XML/SVG text"
    if data[:3] == b"\x1f\x8b\x08":
        return "a gzip archive"
    try:
        data[:4096].decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "unrecognised binary data"


def _decode_bytes(data: bytes, label: str, min_size: int | None) -> np.ndarray:
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageLoadError(
            f"{label}: not an image: looks like {_what_is_it(data)} "
            f"(supported: JPEG, PNG, BMP, TIFF, GIF, WebP, DICOM)"
        )
    if fmt == "DICOM":
        from .dicom import decode_dicom

        return decode_dicom(data, label, max_pixels=MAX_PIXELS, error=ImageLoadError)

    width, height = header_size(data, fmt, label)
    if width * height > MAX_PIXELS:
        raise ImageLoadError(
            f"{label}: too many pixels: the {fmt} header declares {width}x{height} "
            f"({width * height / 1e6:.0f} MP), over the {MAX_PIXELS / 1e6:.0f} MP limit"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(f"{label}: image too small: {width}x{height}, need at least {MIN_SIDE} px on each side")

    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR  # keeps 16-bit; applies EXIF orientation
    if fmt == "JPEG" and min_size:
        flags = _reduced_jpeg_flag(width, height, min_size) or flags
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise ImageLoadError(f"{label}: {_why_decode_failed(data, fmt, width, height)}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # BGRA -> BGR; an alpha channel carries no anatomy
    if image.ndim == 3:
        image = image[:, :, ::-1]  # OpenCV decodes BGR
    return _to_uint8(np.ascontiguousarray(image), label)


_PIL_LIMIT_LOCK = threading.Lock()


def header_size(data: bytes | str | os.PathLike, fmt: str, label: str) -> tuple[int, int]:
    """Width and height from the header alone (of the file's bytes or of a path), before anything is decoded."""
    from PIL import Image

    try:
        # The limit is PIL's global: decoding threads take turns, so none restores another's None.
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we apply our own limit
            try:
                with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                    return im.size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception:  # noqa: BLE001 - any header parse failure means a broken file
        size = f"{len(data)} bytes; " if isinstance(data, bytes) else ""
        variant = " (or a TIFF variant this reader does not support, such as 64-bit float samples)" if fmt == "TIFF" else ""
        raise ImageLoadError(f"{label}: corrupt {fmt} file: its header cannot be read "
                             f"({size}truncated or damaged){variant}") from None


def _reduced_jpeg_flag(width: int, height: int, min_size: int) -> int | None:
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if min(width, height) // factor >= min_size:
            return flag
    return None


def _why_decode_failed(data: bytes, fmt: str, width: int, height: int) -> str:
    size = f"{len(data) / 1024:.0f} KB"
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        return f"truncated JPEG: no end-of-image marker (read {size} of an image that declares {width}x{height})"
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        return f"truncated PNG: no IEND chunk (read {size} of an image that declares {width}x{height})"
    return f"corrupt or unsupported {fmt} data ({size}, declares {width}x{height}); the decoder could not read it"


def _to_uint8(image: np.ndarray, label: str) -> np.ndarray:
    """Scale any integer or [0, 1] float image to uint8 without clipping."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageLoadError(f"{label}: float image contains NaN or inf values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise ImageLoadError(f"{label}: float image values must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]")
        return np.rint(image * 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        if image.min() < 0:
            raise ImageLoadError(f"{label}: signed image with negative values; convert it to unsigned or [0, 1] floats")
        # Scale by the bit depth the data actually uses (12-bit data in a 16-bit container stays
        # bright; 8-bit data stored as x*257 comes back exactly). The maximum maps to <= 255: no clipping.
        peak = int(image.max())
        bits = max(8, peak.bit_length())
        scale = np.float32(255.0 / ((1 << bits) - 1))
        # In float32 and by bands of rows: a 100 MP 16-bit film would otherwise take gigabytes of float64.
        out = np.empty(image.shape, np.uint8)
        step = max(1, (1 << 22) // max(1, image[0].size))
        for row in range(0, image.shape[0], step):
            out[row : row + step] = np.rint(image[row : row + step].astype(np.float32) * scale)
        return out
    raise ImageLoadError(f"{label}: unsupported pixel type {image.dtype}")


def _array_to_rgb(array: np.ndarray, label: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageLoadError(f"{label}: array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.size == 0:
        raise ImageLoadError(f"{label}: empty array")
    h, w = array.shape[:2]
    if h * w > MAX_PIXELS:
        raise ImageLoadError(f"{label}: too many pixels ({w}x{h}), over the {MAX_PIXELS / 1e6:.0f} MP limit")
    return _to_uint8(np.ascontiguousarray(array), label)


def _pil_to_rgb(image: Any, label: str) -> np.ndarray:
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image)
        if image.mode == "I;16B":
            array = array.astype(np.uint16)
        return _array_to_rgb(array, label)
    return _array_to_rgb(np.asarray(image.convert("RGB")), label)


def _finish(image: np.ndarray, label: str) -> np.ndarray:
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageLoadError(f"{label}: image too small: {w}x{h}, need at least {MIN_SIDE} px on each side")
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------------------------
# Tensor transform


# CLAHE as commonly used on chest radiographs: a mild clip, an 8 x 8 grid of tiles.
CLAHE_CLIP = 2.0
CLAHE_TILES = 8
# "standardize": every image's grey level gets this mean and standard deviation (uint8 scale).
STANDARD_MEAN = 128.0
STANDARD_STD = 48.0


def contrast_step(mode: str) -> str:
    """The per-image contrast step in words (empty for "none"), for the card and the demo: whoever
    feeds the model from another program must apply it, or the model sees images it never trained on."""
    return {
        "none": "",
        "standardize": f"converted to grey and each image's grey levels standardised to mean {STANDARD_MEAN:g} and "
                       f"standard deviation {STANDARD_STD:g} (of 255)",
        "clahe": f"converted to grey and locally equalised (CLAHE, clip limit {CLAHE_CLIP:g}, {CLAHE_TILES}×{CLAHE_TILES} tiles)",
        "equalize": "converted to grey and each image's grey-level histogram equalised",
    }[mode]


class Preprocessor:
    """Resize and normalize RGB uint8 images exactly as the model expects, from its config.

    ``resize`` works on uint8 with area interpolation, so training can cache its output and
    augment small tensors. ``normalize`` turns a uint8 ``(N, 3, S, S)`` or ``(3, S, S)`` tensor into
    floats with the config's mean/std. ``__call__`` does both for one image.
    """

    def __init__(self, config: ChestXrayConfig):
        self.config = config  # read at each use, so a changed config changes the preprocessing too

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.config.mean, dtype=torch.float32).view(3, 1, 1) * 255

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.config.std, dtype=torch.float32).view(3, 1, 1) * 255

    def resize(self, image: np.ndarray) -> np.ndarray:
        size = self.image_size
        if image.shape[:2] == (size, size):
            return image
        h, w = image.shape[:2]
        # Area averaging when shrinking (no aliasing); bilinear when a small image must grow.
        interpolation = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
        return cv2.resize(image, (size, size), interpolation=interpolation)

    def normalize_contrast(self, image: np.ndarray) -> np.ndarray:
        """The config's per-image contrast normalisation of a resized RGB uint8 image (grey out)."""
        mode = self.config.contrast
        if mode == "none":
            return image
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if mode == "clahe":
            gray = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(gray)
        elif mode == "equalize":
            gray = cv2.equalizeHist(gray)
        else:  # "standardize"
            values = gray.astype(np.float32)
            std = max(float(values.std()), 1.0)  # a blank image stays blank instead of exploding its noise
            gray = np.clip((values - values.mean()) * (STANDARD_STD / std) + STANDARD_MEAN, 0, 255).round().astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)

    def normalize_contrast_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize_contrast` of a uint8 ``(3, S, S)`` tensor (an augmented training image)."""
        if self.config.contrast == "none":
            return image
        rgb = self.normalize_contrast(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))

    def to_uint8_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 array -> resized, contrast-normalised (3, S, S) uint8 tensor."""
        return torch.from_numpy(np.ascontiguousarray(self.normalize_contrast(self.resize(image)).transpose(2, 0, 1)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - mean) / std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalize(self.to_uint8_tensor(image))

    def load(self, source: ImageSource, *, name: str | None = None) -> np.ndarray:
        """Decode a source at the smallest size that still covers the model's input."""
        return load_image(source, name=name, min_size=self.image_size)
