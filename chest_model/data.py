"""Class-folder datasets: discovery and validation, the stratified split, the decode-once cache and
training augmentation.

Every file is decoded once per run (JPEGs at reduced scale), resized once to the model's input size
and kept as uint8. Augmentation then works on these small tensors, never on the multi-megapixel
original, and normalization happens on the batch through the model's :class:`Preprocessor`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .preprocess import ImageLoadError, Preprocessor, load_image

logger = logging.getLogger(__name__)

TRAIN_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")


class DatasetError(ValueError):
    """A data folder that cannot be trained on; the message lists every problem, file by file."""


@dataclass
class ImageFolder:
    root: Path
    class_names: list[str]
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(self.class_names)}


def _is_dicom_by_content(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_image_file(path: Path) -> bool:
    """Known image extensions in any case, plus DICOM files recognised by content (they often have none)."""
    if path.name.startswith(".") or not path.is_file():
        return False
    return path.suffix.lower() in TRAIN_EXTENSIONS or _is_dicom_by_content(path)


def scan_image_folder(root: str | Path, class_names: list[str]) -> tuple[ImageFolder, list[str]]:
    """List ``root/<class>/<image>`` files; return the folder and a list of problems (empty when fine)."""
    root = Path(root)
    problems: list[str] = []
    folder = ImageFolder(root, list(class_names))
    if not root.is_dir():
        return folder, [f"{root}: data folder does not exist"]
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = [name for name in present if name not in class_names]
    if extra:
        problems.append(
            f"{root}: class folder(s) {extra} do not match the model's classes {list(class_names)} "
            "(rename them, or pass --class-names to train another set)"
        )
    for label, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            problems.append(f"{class_dir}: missing class folder for '{name}'")
            continue
        files = sorted(p for p in class_dir.rglob("*") if is_image_file(p))
        if not files:
            problems.append(f"{class_dir}: no image files ({', '.join(TRAIN_EXTENSIONS)}, any case)")
        folder.paths.extend(files)
        folder.labels.extend([label] * len(files))
    return folder, problems


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded split that keeps each class's share in both parts."""
    from sklearn.model_selection import train_test_split

    n, k = len(labels), len(set(labels))
    size = max(k, int(np.ceil(fraction * n)))  # as scikit-learn rounds; at least one image per class
    if not 0 < fraction < 1 or n - size < k or min(np.bincount(labels)) < 2:
        raise DatasetError(
            f"cannot split {n} images ({k} classes, smallest class {min(np.bincount(labels))}) into train and "
            f"validation with --val-split {fraction}; add images or pass --val-dir"
        )
    indices = np.arange(n)
    train_idx, val_idx = train_test_split(indices, test_size=size, stratify=labels, random_state=seed)
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def decode_folder(
    paths: list[Path], preprocessor: Preprocessor, *, num_threads: int | None = None
) -> tuple[torch.Tensor, list[str | None]]:
    """Decode and resize every file once: a ``(N, 3, S, S)`` uint8 tensor and per-file errors (None if ok)."""
    size = preprocessor.image_size
    images = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8)
    errors: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        try:
            images[i] = preprocessor.to_uint8_tensor(load_image(paths[i], min_size=size))
        except ImageLoadError as err:
            errors[i] = str(err)

    # OpenCV releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=num_threads or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(len(paths))))
    return images, errors


def build_train_augmentation():
    """Small, anatomy-preserving changes on uint8 tensors (torchvision transforms v2).

    - RandomAffine: patient position and framing differ between radiographs by a few degrees and a
      few percent; larger rotations or flips would create anatomy (heart on the right) that never occurs.
    - ColorJitter on brightness/contrast: exposure and detector response vary between machines.
      Hue/saturation jitter is meaningless on grayscale X-rays.
    """
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])


class CachedImageDataset(Dataset):
    """uint8 images in memory with their labels; optional augmentation, reproducible per epoch.

    The augmentation of sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``, so a resumed
    run, or a run with a different number of workers or processes, sees the same images.
    """

    def __init__(self, images: torch.Tensor, labels: list[int], transform=None, seed: int = 0):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{index}".encode(), digest_size=8).digest()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
                image = self.transform(image)
        return image, self.labels[index]
