"""Train-test leakage audit: which evaluation images are copies of a training image?

Public chest X-ray collections are assembled from other collections, and the same film often sits
in both a dataset's train and test folders, sometimes re-encoded, resized or with another contrast.
A model that has seen the film scores it from memory, so its test figure overstates what it does on
new patients. Each image gets a perceptual hash (DCT hash of the grey image, ``imagehash.phash``);
two images whose hashes differ in at most ``MAX_DISTANCE`` of their bits are taken to be one film.

Why 256 bits and 40: on the COVID-19 Image Dataset, copies of one film (identical files, and films
exported again with other contrast or size) lie 0-22 bits apart, while the closest two distinct
films among its 248 training images and the 289 adult normals of the two adult-normal sources lie 58
bits apart. The 64-bit hash cannot separate them: distinct children's films come within 6 bits,
re-processed copies lie 4 bits apart.

What it does not catch: a copy flipped, rotated, or cropped by more than about 2% of each side moves
most of the hash's bits (on the dataset's films, a 3% crop was caught in 1 of 20), so "no copy
found" bounds the leakage from below.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

HASH_SIZE = 16  # a 16 x 16 DCT: 256 bits
HASH_BITS = HASH_SIZE ** 2
MAX_DISTANCE = 40


def image_hash(image: np.ndarray) -> np.ndarray:
    """The ``(HASH_BITS,)`` boolean perceptual hash of a decoded uint8 image: grey ``(H, W)`` or
    ``(H, W, 1)``, RGB ``(H, W, 3)`` or RGBA ``(H, W, 4)`` (what ``load_image`` returns is RGB)."""
    import imagehash  # the training extra: only the audits hash images
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"image_hash needs a uint8 image (decode files with chest_model.load_image), got {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim != 2:
        raise ValueError(f"image_hash needs an (H, W) or (H, W, 1|3|4) image, got shape {image.shape}")
    return imagehash.phash(Image.fromarray(np.ascontiguousarray(image)), hash_size=HASH_SIZE).hash.flatten()


def hash_matrix(hashes: Sequence[np.ndarray]) -> np.ndarray:
    """``(N, HASH_BITS)`` booleans from a list of hashes (``(0, HASH_BITS)`` for none)."""
    return np.array(list(hashes), dtype=bool).reshape(len(hashes), HASH_BITS)


def cached_image_hashes(images) -> np.ndarray:
    """Hashes of training's cached ``(N, 3, S, S)`` uint8 images (resized and contrast-normalised).

    The hash keeps only which of the lowest frequencies lie above their median, which resizing and a
    per-image contrast stretch barely move (tests/test_duplicates.py measures it on real films)."""
    return hash_matrix([image_hash(image.permute(1, 2, 0).numpy()) for image in images])


def hamming_blocks(queries: np.ndarray, references: np.ndarray, chunk: int = 512):
    """``(start, distances)`` for each block of ``chunk`` query hashes: their Hamming distances to every
    reference hash, as a float32 matrix product (exact for 256 bits, and BLAS's, where an integer
    product is numpy's own loop: 2,000 x 20,000 hashes in 0.4 s instead of 7.7 s here). A block at a
    time, so that a large set never holds its whole distance matrix."""
    q = np.asarray(queries, dtype=bool).astype(np.float32)
    r = np.asarray(references, dtype=bool).astype(np.float32)
    r_ones = r.sum(1)
    for start in range(0, len(q), chunk):
        block = q[start : start + chunk]
        # bits that differ = ones(a) + ones(b) - 2 * common ones
        yield start, block.sum(1)[:, None] + r_ones[None, :] - 2 * (block @ r.T)


def nearest(queries: np.ndarray, references: np.ndarray, *, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the index of the closest reference hash and their Hamming distance."""
    if not len(queries) or not len(references):
        return np.zeros(len(queries), dtype=np.int64), np.full(len(queries), np.iinfo(np.int64).max)
    index = np.empty(len(queries), dtype=np.int64)
    distance = np.empty(len(queries), dtype=np.int64)
    for start, distances in hamming_blocks(queries, references, chunk):
        rows = np.arange(len(distances))
        index[start : start + len(rows)] = distances.argmin(axis=1)
        distance[start : start + len(rows)] = np.rint(distances[rows, index[start : start + len(rows)]])
    return index, distance


def copies_across_labels(hashes: np.ndarray, labels: Sequence[int], *, max_distance: int = MAX_DISTANCE,
                         chunk: int = 512) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for each pair ``i < j`` of images that are one film by their hashes and carry
    different labels: an image filed under two classes (distances by :func:`hamming_blocks`: 100,000
    images are a matter of seconds)."""
    labels = np.asarray(labels)
    n = len(labels)
    pairs = []
    for start, distances in hamming_blocks(hashes, hashes, chunk):
        stop = start + len(distances)
        near = ((distances <= max_distance) & (labels[start:stop, None] != labels[None, :])
                & (np.arange(start, stop)[:, None] < np.arange(n)[None, :]))
        pairs += [(start + int(r), int(c), int(distances[r, c])) for r, c in zip(*np.nonzero(near))]
    return pairs


def copies_by_class(copied: np.ndarray, labels: Sequence[int], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{class: {"copies": k, "n": n}}`` over the classes present."""
    copied, labels = np.asarray(copied, dtype=bool), np.asarray(labels)
    return {name: {"copies": int(copied[labels == c].sum()), "n": int((labels == c).sum())}
            for c, name in enumerate(class_names) if (labels == c).any()}


def train_test_copies(eval_hashes: np.ndarray, eval_labels: Sequence[int], eval_files: Sequence[str],
                      train_hashes: np.ndarray, train_files: Sequence[str], class_names: Sequence[str],
                      *, max_distance: int = MAX_DISTANCE) -> tuple[dict[str, Any], np.ndarray]:
    """Evaluation images with a copy among the training images: how many, of which class, and which
    files (a JSON-ready report), and the ``(N,)`` mask of those images."""
    index, distance = nearest(eval_hashes, train_hashes)
    copied = distance <= max_distance
    report = {
        "n": int(copied.sum()),
        "of": len(copied),
        "by_class": copies_by_class(copied, eval_labels, class_names),
        "pairs": [{"file": eval_files[i], "train_file": train_files[index[i]], "distance": int(distance[i])}
                  for i in np.flatnonzero(copied)],
        "max_distance": max_distance,
        "hash_bits": HASH_BITS,
        "n_train": len(train_files),
    }
    return report, copied
