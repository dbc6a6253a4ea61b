"""The framing check: does the model's answer follow how tightly a film is cropped, rather than the lungs?

Collections frame the chest differently: the tutorial's Covid films are often cropped tight, its
children's films and the adult-normal releases show the whole thorax with margins. A model can learn
the framing as the class, and then calls a normal film from a hospital that collimates tighter
"Covid". The check crops each film around its centre (the same anatomy, framed otherwise), classifies
it again, and reports, per group of films, the share called each class and the share whose answer
changed. Nothing is fitted, so it may be run on any labelled films, test or external.

The tone check asks the same of the grey-level curve: detectors and their look-up tables render the
same dose lighter or darker in the mid-greys, so each film goes through a gamma curve and is
classified again. ``--contrast standardize`` keeps the curve's shape; ``--contrast equalize`` does not.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
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


# (name, gamma): the same film through another tone curve; gamma < 1 lightens the mid-greys.
TONES = (
    ("as given", 1.0),
    ("gamma 0.7 (mid-greys lighter)", 0.7),
    ("gamma 1.4 (mid-greys darker)", 1.4),
)


def tone_curve(image: np.ndarray, gamma: float) -> np.ndarray:
    """A uint8 image through the curve ``255 * (level / 255) ** gamma``; black and white stay put."""
    lut = np.rint(255 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return lut[image]


def framing_check(model, images: Sequence[ImageSource], groups: Sequence[str], *, batch_size: int = 16,
                  precision: str = "fp32") -> dict[str, Any]:
    """Per group (e.g. true class, or "source / class") and framing: the share of its films called each
    class, flagged uncertain, and whose top class differs from the film as given.

    ``images`` are files (decoded here, large enough that the tightest crop still covers the model's
    input, so no crop is softer than another; the film as given is decoded as the model reads it) or
    decoded arrays; ``groups`` names each one's group.
    """
    tightest = min(min(keep_width, keep_height) for _, keep_width, keep_height in FRAMINGS)
    variants = [(name, lambda image, w=keep_width, h=keep_height: centre_crop(image, w, h, min_side=MIN_SIDE))
                for name, keep_width, keep_height in FRAMINGS]
    return _variant_check(model, images, groups, variants, "framings", math.ceil(model.config.image_size / tightest),
                          batch_size, precision)


def tone_check(model, images: Sequence[ImageSource], groups: Sequence[str], *, batch_size: int = 16,
               precision: str = "fp32") -> dict[str, Any]:
    """As :func:`framing_check`, each film through the gamma curves of ``TONES`` instead of crops."""
    variants = [(name, lambda image, g=gamma: image if g == 1.0 else tone_curve(image, g)) for name, gamma in TONES]
    return _variant_check(model, images, groups, variants, "tones", model.config.image_size, batch_size, precision)


def _variant_check(model, images, groups, variants: Sequence[tuple[str, Callable[[np.ndarray], np.ndarray]]],
                   key: str, min_size: int, batch_size: int, precision: str) -> dict[str, Any]:
    if len(images) != len(groups):
        raise ValueError(f"{len(images)} images but {len(groups)} group names")
    own_size = model.config.image_size
    images = [image.read() if hasattr(image, "read") else image for image in images]  # a stream is read once
    decoded = [load_image(image, min_size=min_size) for image in images]
    # The film as given is what the model itself reads: decoded at its own size, which for a JPEG can
    # be a smaller decode than the crops need (the two differ by up to a few hundredths in probability).
    as_read = decoded
    if min_size != own_size:
        as_read = []
        for image, first in zip(images, decoded):
            again = load_image(image, min_size=own_size)
            as_read.append(first if again.shape == first.shape and np.array_equal(again, first) else again)
    class_names = model.class_names
    groups = np.asarray(groups, dtype=object)
    top, uncertain = {}, {}
    for i, (name, change) in enumerate(variants):
        changed = as_read if i == 0 else [change(image) for image in decoded]
        inference = model.infer(changed, batch_size=batch_size, precision=precision)
        top[name] = inference.probabilities.argmax(dim=1).numpy()
        uncertain[name] = np.array([bool(r) for r in inference.reasons(changed, model.config)], dtype=bool)
    as_given = top[variants[0][0]]
    # A crop's answer is compared with the whole film at the crop's own decode, so that a change of
    # decode scale is not counted as a change of framing.
    baseline = as_given
    if any(a is not d for a, d in zip(as_read, decoded)):
        baseline = model.infer(decoded, batch_size=batch_size, precision=precision).probabilities.argmax(dim=1).numpy()
    result: dict[str, Any] = {key: [name for name, _ in variants], "groups": {}}
    for group in dict.fromkeys(groups.tolist()):  # in order of first appearance
        mask = groups == group
        result["groups"][group] = {"n": int(mask.sum()), key: {
            name: {"called": {cls: float((top[name][mask] == c).mean()) for c, cls in enumerate(class_names)},
                   "uncertain": float(uncertain[name][mask].mean()),
                   "changed": float((top[name][mask] != (as_given if name == variants[0][0] else baseline)[mask]).mean())}
            for name, _ in variants}}
    return result


def framing_lines(check: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    """The check (framing or tone) as a plain-text table, one row per group and variant."""
    key = "tones" if "tones" in check else "framings"
    title = ("tone check (each film through another gamma curve and classified again):" if key == "tones" else
             "framing check (each film cropped around its centre and classified again):")
    width = max(len(name) for name in check[key])
    lines = [title, f"  {key[:-1]:{width}s}  " + "  ".join(f"{c:>16s}" for c in class_names) + f"  {'uncertain':>9s}  {'changed':>7s}"]
    for group, row in check["groups"].items():
        lines.append(f"  {group} ({row['n']} films)")
        for name, cell in row[key].items():
            lines.append(f"  {name:{width}s}  " + "  ".join(f"{cell['called'][c]:16.0%}" for c in class_names)
                         + f"  {cell['uncertain']:9.0%}  {cell['changed']:7.0%}")
    return lines
