"""Generates the input corpus: valid encodings of one synthetic X-ray and hostile inputs.

Nothing here is committed as a binary: every file is made on the fly. Run it as a script to write
the corpus to a folder (``python tests/corpus.py OUT_DIR``) for manual poking at the CLI or demo.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import synthetic_xray  # noqa: E402


@dataclass
class Case:
    name: str          # file name, extension included
    data: bytes
    error: str | None  # None: must decode; otherwise a substring of the ImageLoadError message


def base_xray() -> np.ndarray:
    """The reference picture, stretched to the full 0..255 range so every encoding can represent it."""
    gray = synthetic_xray(160, 128, seed=7).astype(np.float64)
    return np.rint((gray - gray.min()) * 255 / (gray.max() - gray.min())).astype(np.uint8)


def _cv2_encode(ext: str, image: np.ndarray, params=None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok, ext
    return buf.tobytes()


def _pil_bytes(image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height over a few bytes of data (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def dicom_bytes(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", frames: int = 1,
                slope: float | None = None, intercept: float | None = None, window: tuple[float, float] | None = None,
                transfer_syntax: str | None = None, pixel_data: bytes | None = None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "Synthetic^Phantom"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data is not None:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([pixel_data])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def valid_cases() -> list[Case]:
    """The same X-ray in every supported encoding; each must decode to (nearly) the same picture."""
    from PIL import Image

    gray = base_xray()
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    pil_gray = Image.fromarray(gray)
    cases = [
        Case("gray.png", _cv2_encode(".png", gray), None),
        Case("rgb.png", _cv2_encode(".png", bgr), None),
        Case("rgba.png", _cv2_encode(".png", np.dstack([bgr, np.full_like(gray, 255)])), None),
        Case("palette.png", _pil_bytes(pil_gray.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"), None),
        Case("gray16.png", _cv2_encode(".png", gray.astype(np.uint16) * 257), None),
        Case("gray.jpeg", _cv2_encode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95]), None),
        Case("rgb.JPG", _cv2_encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95]), None),
        Case("cmyk.jpg", _pil_bytes(Image.fromarray(gray).convert("RGB").convert("CMYK"), "JPEG", quality=95), None),
        Case("gray.bmp", _cv2_encode(".bmp", gray), None),
        Case("gray.tiff", _cv2_encode(".tiff", gray), None),
        Case("gray.webp", _cv2_encode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101]), None),
        Case("gray.gif", _pil_bytes(pil_gray, "GIF"), None),
        Case("mono2.dcm", dicom_bytes(gray.astype(np.uint16) * 16), None),
        Case("mono1.dcm", dicom_bytes((255 - gray.astype(np.uint16)) * 16, photometric="MONOCHROME1"), None),
        Case("rescaled.dcm", dicom_bytes(gray.astype(np.uint16) * 8, slope=2.0, intercept=-1024.0), None),
        Case("windowed.dcm", dicom_bytes(gray.astype(np.uint16) * 16, window=(2048.0, 4096.0)), None),
        Case("no_extension_dicom", dicom_bytes(gray.astype(np.uint16) * 16), None),
        Case("png_named.jpg", _cv2_encode(".png", gray), None),
        Case("gray16.tiff", _cv2_encode(".tiff", gray.astype(np.uint16) * 257), None),
        Case("rgba.webp", _cv2_encode(".webp", np.dstack([bgr, np.full_like(gray, 255)]), [cv2.IMWRITE_WEBP_QUALITY, 101]), None),
        Case("UPPER.PNG", _cv2_encode(".png", gray), None),
    ]
    # EXIF-rotated: stored transposed with Orientation=6 (rotate 90° clockwise on display).
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(gray, 1)))  # counter-clockwise; display turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    cases.append(Case("exif_rotated.jpg", _pil_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()), None))
    return cases


def bad_cases() -> list[Case]:
    from pydicom.uid import JPEGLSLossless

    gray = base_xray()
    png = _cv2_encode(".png", gray)
    jpeg = _cv2_encode(".jpg", gray)
    rng = np.random.default_rng(0)
    return [
        Case("empty.png", b"", "empty file"),
        Case("random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        Case("zeros.png", bytes(2048), "not an image"),
        Case("page.png", b"<!DOCTYPE html><html><body>not an x-ray</body></html>", "HTML"),
        Case("notes.jpg", b"patient notes\nnothing to see here\n" * 20, "text file"),
        Case("report.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "PDF"),
        Case("archive.jpeg", b"PK\x03\x04" + bytes(200), "ZIP"),
        Case("svg.png", b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
        Case("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated JPEG"),
        Case("truncated.png", png[: len(png) // 2], "PNG"),
        Case("header_only.png", png[:40], "PNG"),
        Case("jpeg_magic_only.jpg", b"\xff\xd8\xff\xe0" + bytes(100), "JPEG"),
        Case("one_pixel.png", _cv2_encode(".png", np.zeros((1, 1), np.uint8)), "too small"),
        Case("line.png", _cv2_encode(".png", np.zeros((1, 100_000), np.uint8)), "too small"),
        Case("tiny.jpg", _cv2_encode(".jpg", np.zeros((16, 16), np.uint8)), "too small"),
        Case("bomb.png", png_with_header(100_000, 100_000), "too many pixels"),
        Case("multiframe.dcm", dicom_bytes(np.zeros((3, 64, 64), np.uint16), frames=3), "multi-frame"),
        Case("jpegls.dcm", dicom_bytes(np.zeros((64, 64), np.uint16), transfer_syntax=JPEGLSLossless, pixel_data=b"\xff\xd8" + bytes(64)), "transfer syntax"),
        Case("broken.dcm", bytes(128) + b"DICM" + b"\x02\x00\x10\x00garbage", "DICOM"),
        Case("truncated.dcm", dicom_bytes(gray.astype(np.uint16) * 16)[:-5000], "DICOM"),
        Case("report.dcm", _dicom_without_pixels(), "no pixel data"),
        Case("jpeg_bomb.jpg", _jpeg_with_header(60_000, 60_000), "too many pixels"),
        Case("gzip.png", b"\x1f\x8b\x08\x00" + bytes(100), "gzip"),
        Case("bmp_header_only.bmp", b"BM" + bytes(20), "BMP"),
        Case("truncated.webp", _cv2_encode(".webp", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))[:300], "WebP"),
    ]


def _jpeg_with_header(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to claim width x height."""
    data = bytearray(_cv2_encode(".jpg", base_xray()))
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_corpus(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for case in valid_cases() + bad_cases():
        (out / case.name).write_bytes(case.data)


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus"))
