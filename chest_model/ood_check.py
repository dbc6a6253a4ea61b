"""Measure a model's "uncertain" gate on images that are not chest X-rays, all available offline.

- real photographs, documents, microscopy and other medical images (CT, MRI, retina, histology)
  that ship inside installed packages: scikit-image, scikit-learn, matplotlib and pydicom;
- generated images: blank, gradients, noise, patterns, a page of text, shapes.

Nothing here is used to fit anything: the thresholds come from training and validation X-rays
only. ``chest-model ood-check --model M`` prints the share of these images flagged as uncertain.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Bundled with scikit-image (no download): photographs, documents, microscopy, retina, a CT phantom.
SKIMAGE_FILES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_GRAY.png", "clock_motion.png",
    "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
    "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg",
    "rocket.jpg", "text.png",
)
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm")
MATPLOTLIB_FILES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


@dataclass
class Sample:
    name: str
    kind: str   # "photograph or document", "other medical image", "generated"
    image: np.ndarray | bytes


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


# The packages whose bundled images the check uses, and the pip name each comes with.
IMAGE_PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "pydicom": "pydicom"}


def missing_image_packages() -> list[str]:
    """The packages (pip names) whose images are skipped because they are not installed."""
    return [pip for module, pip in IMAGE_PACKAGES.items() if _package_dir(module) is None]


def packaged_images() -> list[Sample]:
    """Real non-X-ray images from the installed packages (those missing are skipped)."""
    samples = []
    medical = {"cell.png", "ihc.png", "microaneurysms.png", "phantom.png", "retina.jpg"}
    skimage = _package_dir("skimage")
    if skimage:
        for name in SKIMAGE_FILES:
            path = skimage / "data" / name
            if path.is_file():
                kind = "other medical image" if name in medical else "photograph or document"
                samples.append(Sample(f"scikit-image/{name}", kind, path.read_bytes()))
    sklearn = _package_dir("sklearn")
    if sklearn:
        for name in ("china.jpg", "flower.jpg"):
            path = sklearn / "datasets" / "images" / name
            if path.is_file():
                samples.append(Sample(f"scikit-learn/{name}", "photograph or document", path.read_bytes()))
    matplotlib = _package_dir("matplotlib")
    if matplotlib:
        sample_data = matplotlib / "mpl-data" / "sample_data"
        for name in MATPLOTLIB_FILES:
            if (sample_data / name).is_file():
                samples.append(Sample(f"matplotlib/{name}", "photograph or document", (sample_data / name).read_bytes()))
        mri = sample_data / "s1045.ima.gz"  # a 256x256 16-bit big-endian MRI slice
        if mri.is_file():
            pixels = np.frombuffer(gzip.decompress(mri.read_bytes()), ">u2").reshape(256, 256).astype(np.uint16)
            samples.append(Sample("matplotlib/s1045.ima.gz", "other medical image", pixels))
    pydicom = _package_dir("pydicom")
    if pydicom:
        for name in PYDICOM_FILES:
            path = pydicom / "data" / "test_files" / name
            if path.is_file():
                samples.append(Sample(f"pydicom/{name}", "other medical image", path.read_bytes()))
    return samples


def generated_images(size: int = 256, seed: int = 0) -> list[Sample]:
    """Synthetic non-X-rays: what a confused user or a broken pipeline might send."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    page = np.full((size, size), 250, np.uint8)
    for row in range(12):
        cv2.putText(page, "Lorem ipsum dolor sit amet", (8, 20 + 19 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 20, 1)
    shapes = np.full((size, size, 3), 30, np.uint8)
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(shapes, tuple(int(c) for c in rng.integers(0, size, 2)), int(rng.integers(10, 60)), colour, -1)
    images = {
        "blank grey": np.full((size, size), 128, np.uint8),
        "black": np.zeros((size, size), np.uint8),
        "horizontal gradient": (xx * 255).astype(np.uint8),
        "grey noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "colour noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "checkerboard": (((np.floor(xx * 8) + np.floor(yy * 8)) % 2) * 255).astype(np.uint8),
        "stripes": ((np.sin(xx * 60) > 0) * 200 + 20).astype(np.uint8),
        "page of text": page,
        "coloured shapes": shapes,
        "smooth blobs": cv2.GaussianBlur(rng.integers(0, 256, (size, size), dtype=np.uint8), (0, 0), 12),
    }
    return [Sample(f"generated/{name}", "generated", image) for name, image in images.items()]


def non_xray_images() -> list[Sample]:
    return packaged_images() + generated_images()


def check(model, samples: list[Sample] | None = None, *, precision: str = "fp32") -> dict:
    """Share of the samples the model reports as uncertain, overall and by kind, with each verdict."""
    not_installed = missing_image_packages() if samples is None else []
    samples = non_xray_images() if samples is None else samples
    predictions = model.predict([s.image for s in samples], precision=precision) if samples else []
    rows = [{"name": s.name, "kind": s.kind, "uncertain": p.uncertain, "label": p.label, "reasons": p.reasons}
            for s, p in zip(samples, predictions)]
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        flagged = [r["uncertain"] for r in rows if r["kind"] == kind]
        by_kind[kind] = {"n": len(flagged), "flagged": int(sum(flagged)), "rate": float(np.mean(flagged))}
    flagged = [r["uncertain"] for r in rows]
    return {"n": len(rows), "flagged": int(sum(flagged)), "rate": float(np.mean(flagged)) if rows else 0.0,
            "by_kind": by_kind, "images": rows, "not_installed": not_installed}
