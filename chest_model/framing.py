"""The framing check: does the model's answer follow how tightly a film is cropped, rather than the lungs?

Collections frame the chest differently: the tutorial's Covid films are often cropped tight, its
children's films and the adult-normal releases show the whole thorax with margins. A model can learn
the framing as the class, and then calls a normal film from a hospital that collimates tighter
"Covid". The check crops each film around its centre (the same anatomy, framed otherwise), classifies
it again, and reports, per group of films, the share called each class and the share whose answer
changed. Nothing is fitted, so it may be run on any labelled films, test or external.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import math

import numpy as np

from .preprocess import MIN_SIDE, ImageSource, load_image

# (name, kept share of the width, kept share of the height): centre crops of the decoded film.
FRAMINGS = (
    ("as given", 1.0, 1.0),
    ("80% of each side", 0.8, 0.8),
    ("71% of each side (half the area)", 0.71, 0.71),
    ("80% of the width", 0.8, 1.0),
    ("80% of the height", 1.0, 0.8),
)


def centre_crop(image: np.ndarray, keep_width: float, keep_height: float, *, min_side: int = 1) -> np.ndarray:
    """The centre of an ``(H, W, ...)`` image keeping the given shares of its width and height, but
    at least ``min_side`` pixels of each (a film too small to crop stays as it is)."""
    h, w = image.shape[:2]
    nh, nw = min(h, max(min_side, round(h * keep_height))), min(w, max(min_side, round(w * keep_width)))
    y, x = (h - nh) // 2, (w - nw) // 2
    return image[y:y + nh, x:x + nw]


def framing_check(model, images: Sequence[ImageSource], groups: Sequence[str], *, batch_size: int = 16,
                  precision: str = "fp32") -> dict[str, Any]:
    """Per group (e.g. true class, or "source / class") and framing: the share of its films called each
    class, flagged uncertain, and whose top class differs from the film as given.

    ``images`` are files (decoded here, large enough that the tightest crop still covers the model's
    input, so no framing is softer than another) or decoded arrays; ``groups`` names each one's group.
    """
    if len(images) != len(groups):
        raise ValueError(f"{len(images)} images but {len(groups)} group names")
    tightest = min(min(keep_width, keep_height) for _, keep_width, keep_height in FRAMINGS)
    min_size = math.ceil(model.config.image_size / tightest)
    images = [load_image(image, min_size=min_size) for image in images]
    class_names = model.class_names
    groups = np.asarray(groups, dtype=object)
    top, uncertain = {}, {}
    for name, keep_width, keep_height in FRAMINGS:
        framed = [centre_crop(image, keep_width, keep_height, min_side=MIN_SIDE) for image in images]
        inference = model.infer(framed, batch_size=batch_size, precision=precision)
        top[name] = inference.probabilities.argmax(dim=1).numpy()
        uncertain[name] = np.array([bool(r) for r in inference.reasons(framed, model.config)], dtype=bool)
    as_given = top[FRAMINGS[0][0]]
    result: dict[str, Any] = {"framings": [name for name, _, _ in FRAMINGS], "groups": {}}
    for group in dict.fromkeys(groups.tolist()):  # in order of first appearance
        mask = groups == group
        result["groups"][group] = {"n": int(mask.sum()), "framings": {
            name: {"called": {cls: float((top[name][mask] == c).mean()) for c, cls in enumerate(class_names)},
                   "uncertain": float(uncertain[name][mask].mean()),
                   "changed": float((top[name][mask] != as_given[mask]).mean())}
            for name, _, _ in FRAMINGS}}
    return result


def framing_lines(check: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    """The check as a plain-text table, one row per group and framing."""
    width = max(len(name) for name in check["framings"])
    lines = ["framing check (each film cropped around its centre and classified again):",
             f"  {'framing':{width}s}  " + "  ".join(f"{c:>16s}" for c in class_names) + f"  {'uncertain':>9s}  {'changed':>7s}"]
    for group, row in check["groups"].items():
        lines.append(f"  {group} ({row['n']} films)")
        for name, cell in row["framings"].items():
            lines.append(f"  {name:{width}s}  " + "  ".join(f"{cell['called'][c]:16.0%}" for c in class_names)
                         + f"  {cell['uncertain']:9.0%}  {cell['changed']:7.0%}")
    return lines
