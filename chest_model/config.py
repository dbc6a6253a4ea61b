"""The model's configuration: everything needed to rebuild the network and its preprocessing.

Like timm's ``pretrained_cfg``, the config carries the input size, the normalization constants and
the class names, so a saved model always knows how its inputs must be prepared. It round-trips
through ``config.json`` and is validated on the way in.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ChestModelError

DEFAULT_CLASS_NAMES = ("Normal", "Covid", "Viral Pneumonia")
# torchvision's ImageNet statistics; the VGG weights were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("vgg19", "vgg19_bn")
CONTRAST = ("none", "standardize", "clahe", "equalize")
MIN_IMAGE_SIZE = 32
# What config.json must state rather than take from the defaults; the later keys (contrast, the
# calibration and out-of-distribution fields) default to "off" for folders saved before they existed.
REQUIRED_KEYS = ("class_names", "image_size", "mean", "std", "backbone", "hidden_size")


class ConfigError(ChestModelError, ValueError):
    """A config.json, or config values, that cannot describe a valid model."""


@dataclass
class ChestXrayConfig:
    class_names: list[str] = field(default_factory=lambda: list(DEFAULT_CLASS_NAMES))
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    backbone: str = "vgg19"
    # Per-image contrast normalisation after the resize, on the grey level: "standardize" maps each
    # image's mean and standard deviation to fixed values, "clahe" equalises local histograms,
    # "equalize" the whole image's histogram. All take away the brightness and contrast by which X-ray
    # collections differ; only "equalize" also takes away their tone curves (gamma, detector look-up
    # tables): any grey-level mapping that keeps the order of the levels gives the same image.
    contrast: str = "none"
    hidden_size: int = 256
    dropout: float = 0.5
    # Provenance: how the backbone was initialised before training ("random" or the weights' name).
    backbone_init: str = "random"
    # Temperature scaling (logits / temperature), fitted on validation data after training.
    temperature: float = 1.0
    # Out-of-distribution guard: a top probability below this is reported as "uncertain"
    # (fitted on validation data after training; 0 disables it).
    min_confidence: float = 0.0
    # Inputs more colourful than this (mean chroma, 0..1) are flagged; fitted on validation images.
    max_chroma: float = 0.08
    # Feature-space gate (chest_model/feature_ood.py): inputs scoring above this are flagged; 0 disables it.
    # When > 0 the fitted training statistics are stored with the weights. ``feature_fpr`` is the
    # false-positive rate the threshold was fitted for on the validation X-rays.
    feature_threshold: float = 0.0
    feature_fpr: float = 0.0

    def __post_init__(self) -> None:
        # Accept tuples from Python callers; JSON brings lists. Store lists so equality is stable.
        self.class_names = list(self.class_names) if isinstance(self.class_names, (list, tuple)) else self.class_names
        self.mean = list(self.mean) if isinstance(self.mean, (list, tuple)) else self.mean
        self.std = list(self.std) if isinstance(self.std, (list, tuple)) else self.std
        self.validate()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def validate(self) -> None:
        problems = []
        names = self.class_names
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
            problems.append(f"class_names must be a non-empty list of non-empty strings, got {names!r}")
        elif len(set(names)) != len(names):
            problems.append(f"class_names must be unique, got {names!r}")
        elif len(names) < 2:
            problems.append(f"class_names needs at least 2 classes, got {names!r}")
        if not _is_int(self.image_size) or self.image_size < MIN_IMAGE_SIZE:
            problems.append(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {self.image_size!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not (isinstance(value, list) and len(value) == 3 and all(_is_finite_number(v) for v in value)):
                problems.append(f"{key} must be a list of 3 numbers, got {value!r}")
        if isinstance(self.std, list) and all(_is_finite_number(v) for v in self.std) and min(self.std, default=1) <= 0:
            problems.append(f"std values must be > 0, got {self.std!r}")
        if self.contrast not in CONTRAST:
            problems.append(f"contrast must be one of {list(CONTRAST)}, got {self.contrast!r}")
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if not _is_int(self.hidden_size) or self.hidden_size < 1:
            problems.append(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not _is_finite_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.backbone_init, str):
            problems.append(f"backbone_init must be a string, got {self.backbone_init!r}")
        if not _is_finite_number(self.temperature) or self.temperature <= 0:
            problems.append(f"temperature must be a number > 0, got {self.temperature!r}")
        if not _is_finite_number(self.min_confidence) or not 0 <= self.min_confidence < 1:
            problems.append(f"min_confidence must be a number in [0, 1), got {self.min_confidence!r}")
        if not _is_finite_number(self.max_chroma) or not 0 < self.max_chroma <= 1:
            problems.append(f"max_chroma must be a number in (0, 1], got {self.max_chroma!r}")
        if not _is_finite_number(self.feature_threshold) or self.feature_threshold < 0:
            problems.append(f"feature_threshold must be a number >= 0, got {self.feature_threshold!r}")
        if not _is_finite_number(self.feature_fpr) or not 0 <= self.feature_fpr < 1:
            problems.append(f"feature_fpr must be a number in [0, 1), got {self.feature_fpr!r}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config") -> ChestXrayConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ChestXrayConfig:
        """A saved config.json. Every such file has held :data:`REQUIRED_KEYS`: one without them is
        damaged or not ours, and the defaults (another input size, other class names) would load it wrongly."""
        data = read_json(path)
        config = cls.from_dict(data, source=str(path))
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ConfigError(f"{path}: missing key(s) {missing}; a saved model's config.json holds "
                              f"{list(REQUIRED_KEYS)} (ChestXrayClassifier.save_pretrained writes them)")
        return config


def read_json(path: str | Path) -> Any:
    """The JSON document in ``path``; a missing, unreadable or malformed file is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:  # a folder, no permission...
        raise ConfigError(f"{path}: cannot read file ({err.strerror or err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
