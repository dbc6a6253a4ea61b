"""The classifier: torchvision's VGG19 features + a small head. ``forward`` returns logits."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from . import feature_ood
from .card import LIBRARY_NAME, LICENSE, PIPELINE_TAG, TAGS
from .backbones import FEATURE_CHANNELS, build_features, imagenet_features_state_dict, imagenet_weights_name
from .config import ChestXrayConfig
from .precision import PrecisionError, choose_precision
from .preprocess import ImageLoadError, ImageSource, Preprocessor, is_pil_image

logger = logging.getLogger(__name__)


class ChestXrayClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    pipeline_tag=PIPELINE_TAG,
    license=LICENSE,
    tags=list(TAGS),  # a copy: the mixin appends its own tags to the list it is given
):
    """VGG19 chest X-ray classifier (Normal / Covid / Viral Pneumonia by default).

    ``ChestXrayClassifier()`` builds the default 3-class model with random weights and downloads
    nothing. Use :meth:`from_imagenet` to start training from ImageNet weights, and
    :meth:`from_pretrained` to load a trained model from a folder or the Hugging Face Hub.
    Research demo, not for clinical use.
    """

    def __init__(self, config: ChestXrayConfig | dict | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = ChestXrayConfig(**overrides)
        elif isinstance(config, dict):
            config = ChestXrayConfig.from_dict({**config, **overrides})
        elif overrides:
            config = ChestXrayConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.features = build_features(config.backbone)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(FEATURE_CHANNELS, config.hidden_size),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_size, config.num_classes),
        )
        for module in self.head.modules():
            if isinstance(module, nn.Linear):  # torchvision's VGG initialisation for linear layers
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)
        if config.feature_threshold > 0:  # statistics fitted after training; placeholders until loaded
            self._register_feature_buffers()

    @classmethod
    def from_imagenet(cls, config: ChestXrayConfig | dict | None = None, **overrides: Any) -> ChestXrayClassifier:
        """A new model whose backbone starts from torchvision's ImageNet weights (downloads once)."""
        model = cls(config, **overrides)
        model.features.load_state_dict(
            {k.removeprefix("features."): v for k, v in imagenet_features_state_dict(model.config.backbone).items()}
        )
        model.config.backbone_init = imagenet_weights_name(model.config.backbone)
        return model

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def preprocessor(self) -> Preprocessor:
        """Decode, resize and normalize as this model's config says, whatever config it holds now."""
        return Preprocessor(self.config)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map; Grad-CAM and the feature-space OOD gate hook into it."""
        return self.features(pixel_values)

    @property
    def cam_layer(self) -> nn.Module:
        """Grad-CAM's target: the backbone's last ReLU, the one its final max-pool reads (torchvision's
        ``make_layers`` ends every VGG with conv [, batch norm], ReLU, max-pool)."""
        return self.features[-2]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values))

    # -----------------------------------------------------------------------------------------
    # Feature-space out-of-distribution statistics (feature_ood.py), stored as buffers

    def _register_feature_buffers(self, means=None, precisions=None, scales=None) -> None:
        dims = feature_ood.block_dims(self.features)
        device = next(self.parameters()).device

        def tensor(value, shape):
            return torch.zeros(shape, device=device) if value is None else torch.as_tensor(value, dtype=torch.float32, device=device)

        for b, d in enumerate(dims):
            self.register_buffer(f"{feature_ood.BUFFER_PREFIX}mean_{b}", tensor(None if means is None else means[b], (d,)))
            self.register_buffer(f"{feature_ood.BUFFER_PREFIX}precision_{b}", tensor(None if precisions is None else precisions[b], (d, d)))
        self.register_buffer(f"{feature_ood.BUFFER_PREFIX}scale", tensor(scales, (len(dims),)))

    def _apply(self, fn, recurse=True):
        # The gate's statistics stay fp32 when the model is cast (.half(), .to(torch.bfloat16)): its
        # precision-matrix entries reach ~6e4, the edge of fp16, and bf16 would move every distance.
        # They still follow the model to another device.
        prefix = feature_ood.BUFFER_PREFIX
        kept = {name: t for name, t in self._buffers.items() if name.startswith(prefix) and t is not None}
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return result

    def set_feature_statistics(self, means, precisions, scales, *, threshold: float, fpr: float) -> None:
        """Store fitted training statistics and the validation threshold (see feature_ood.py)."""
        self._register_feature_buffers(means, precisions, scales)
        self.config.feature_threshold = float(threshold)
        self.config.feature_fpr = float(fpr)

    def feature_scores(self, block_summaries: list[torch.Tensor]) -> torch.Tensor | None:
        """``(N,)`` feature-space distances, or None for a model without fitted statistics."""
        if not hasattr(self, f"{feature_ood.BUFFER_PREFIX}scale"):
            return None
        return feature_ood.scores(block_summaries, *self._feature_statistics_float64(len(block_summaries)))

    def _feature_statistics_float64(self, n_blocks: int):
        """The gate's buffers in float64, as the distances are computed: converted once, not on every
        call (five 1024² matrices: 15 -> 3 ms a call on an AVX2 CPU), and again whenever they change."""
        prefix = feature_ood.BUFFER_PREFIX
        buffers = ([getattr(self, f"{prefix}mean_{b}") for b in range(n_blocks)]
                   + [getattr(self, f"{prefix}precision_{b}") for b in range(n_blocks)] + [getattr(self, f"{prefix}scale")])
        key = tuple((t.data_ptr(), t._version, t.device) for t in buffers)  # load_state_dict bumps _version; .to() moves data
        cached = getattr(self, "_float64_statistics", None)
        if cached is None or cached[0] != key:
            doubles = [t.double() for t in buffers]
            cached = self._float64_statistics = (key, (doubles[:n_blocks], doubles[n_blocks:-1], doubles[-1]))
        return cached[1]

    # -----------------------------------------------------------------------------------------
    # Inference

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        *,
        batch_size: int = 16,
        precision: str = "fp32",
    ) -> Prediction | list[Prediction]:
        """Class probabilities for one image (a dict) or a list of images (a list of dicts).

        Images may be anything :func:`chest_model.load_image` accepts. Runs in eval mode under
        ``torch.inference_mode()`` and restores the model's previous mode. ``precision`` is
        ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the device runs it faster than fp32: see ``chest_model.precision``).

        Each result is a :class:`Prediction`: a plain ``dict`` of class → probability (summing to 1)
        that also carries an out-of-distribution check: ``.uncertain`` is True, ``.label`` is
        ``"uncertain"`` and ``.reasons`` says why, for inputs that do not look like chest X-rays
        (far from the training X-rays in feature space, colour, blank or document-like images, or
        less confident than 98% of validation X-rays, and without a majority class).
        """
        items, single = as_items(images)
        check_batch_size(batch_size)
        check_precision(precision)
        results = []
        for start in range(0, len(items), batch_size):  # one batch of full-size images held at a time
            decoded = [self._load_item(x, i, len(items), single) for i, x in enumerate(items[start : start + batch_size], start)]
            inference = self.infer(decoded, batch_size=batch_size, precision=precision)
            results += [Prediction(dict(zip(self.class_names, map(float, row))), reasons)
                        for row, reasons in zip(inference.probabilities.tolist(), inference.reasons(decoded, self.config))]
        return results[0] if single else results

    def _load_item(self, source: ImageSource, index: int, count: int, single: bool):
        """Decode one input; in a list, an error says which item it is (bytes and arrays have no name)."""
        if single:
            return self.preprocessor.load(source)
        try:
            return self.preprocessor.load(source)
        except ImageLoadError as err:
            raise ImageLoadError(f"item {index} (counting from 0) of {count}: {err}") from None

    def analyze(self, images: ImageSource | Sequence[ImageSource], *, batch_size: int = 16, precision: str = "fp32"):
        """:meth:`predict` as plain records: ``{"label", "probabilities", "uncertain", "reasons"}``."""
        results = self.predict(images, batch_size=batch_size, precision=precision)
        records = [r.to_record() for r in (results if isinstance(results, list) else [results])]
        return records if isinstance(results, list) else records[0]

    def predict_proba(
        self, images: Iterable[ImageSource], *, batch_size: int = 16, precision: str = "fp32"
    ) -> torch.Tensor:
        """An ``(N, num_classes)`` float tensor of calibrated probabilities."""
        return self.infer(images, batch_size=batch_size, precision=precision).probabilities

    def infer(self, images: Iterable[ImageSource], *, batch_size: int = 16, precision: str = "fp32") -> Inference:
        """Calibrated probabilities and feature-space scores, from one forward pass per batch."""
        items, _ = as_items(images)
        check_batch_size(batch_size)
        check_precision(precision)
        parameter = next(self.parameters())
        device, dtype = parameter.device, parameter.dtype  # a model cast to bf16 or fp64 gets inputs to match
        preprocessor = self.preprocessor  # one for the whole call, as the config stands now
        rows, distances = [], []
        with eval_mode(self), torch.inference_mode():
            for start in range(0, len(items), batch_size):
                batch = torch.stack([preprocessor(preprocessor.load(x)) for x in items[start : start + batch_size]])
                with feature_ood.capture_block_stats(self.features) as captured:
                    rows.append(self.probabilities(batch.to(device, dtype), precision=precision).float().cpu())
                score = self.feature_scores(captured)
                if score is not None:
                    distances.append(score.cpu())
        probabilities = torch.cat(rows) if rows else torch.empty(0, self.config.num_classes)
        return Inference(probabilities, torch.cat(distances) if distances else None)

    def probabilities(self, pixel_values: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
        """Softmax of temperature-scaled logits for already-normalized inputs."""
        with autocast_context(pixel_values.device, precision):
            logits = self(pixel_values.contiguous(memory_format=torch.channels_last))
        return calibrated_probabilities(logits, self.config.temperature)

    # -----------------------------------------------------------------------------------------
    # Saving and loading (see hub.py for why these replace the mixin's defaults)

    def save_pretrained(self, save_directory: str | Path, *, card_context: dict | None = None,
                        weights_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` (the model card) atomically."""
        from .hub import save_model_folder

        if kwargs.pop("push_to_hub", False):
            raise TypeError("use model.push_to_hub(repo_id) to upload")
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("weights are only saved as safetensors: pickled weights are never written or loaded")
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}")
        save_model_folder(self, save_directory, card_context=card_context, weights_dtype=weights_dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> ChestXrayClassifier:
        from .hub import load_model

        return load_model(cls, pretrained_model_name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from .hub import push_model

        return push_model(self, repo_id, **kwargs)


def calibrated_log_probabilities(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """The one formula from logits to (log) probabilities: a temperature-scaled log-softmax, in fp32.

    Losses take it as is (``F.nll_loss``); everything that shows a probability goes through
    :func:`calibrated_probabilities`.
    """
    return torch.log_softmax(logits.float() / temperature, dim=1)


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated class probabilities: the exponential of :func:`calibrated_log_probabilities`."""
    return calibrated_log_probabilities(logits, temperature).exp()


@dataclass
class Inference:
    """What one forward pass over a list of images gives: probabilities and feature-space scores."""

    probabilities: torch.Tensor            # (N, num_classes), calibrated
    feature_scores: torch.Tensor | None    # (N,), None for a model without fitted statistics

    def reasons(self, images: Sequence, config: ChestXrayConfig) -> list[list[str]]:
        """Every out-of-distribution reason for each image, under the config's fitted thresholds."""
        from .ood import ood_reasons

        names = config.class_names
        scores = [None] * len(images) if self.feature_scores is None else self.feature_scores.tolist()
        return [ood_reasons(image, dict(zip(names, row)), config, feature_score=score)
                for image, row, score in zip(images, self.probabilities.tolist(), scores)]


class Prediction(dict):
    """Class → probability (a plain dict, summing to 1) with the out-of-distribution verdict."""

    def __init__(self, probabilities: dict[str, float], reasons: list[str] | None = None):
        super().__init__(probabilities)
        self.reasons = list(reasons or [])
        self.uncertain = bool(self.reasons)
        self.label = "uncertain" if self.uncertain else max(probabilities, key=probabilities.get)

    def to_record(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": dict(self), "uncertain": self.uncertain, "reasons": self.reasons}

    def __repr__(self) -> str:  # printed, an uncertain result must not look confident
        return f"Prediction(label={self.label!r}, {dict.__repr__(self)}" + (f", reasons={self.reasons!r})" if self.reasons else ")")


def as_items(images) -> tuple[list, bool]:
    """One image (a path, bytes, a numpy array, a PIL image) as a list of one, and ``single``; any
    other iterable (a list, a tuple, a generator) as its items. A numpy array is always one image:
    pass a list of arrays for several."""
    single = (isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) or is_pil_image(images)
              or hasattr(images, "read"))
    if not single and (isinstance(images, (dict, set, frozenset)) or not isinstance(images, Iterable)):
        raise TypeError("expected an image (a path, bytes, a file object, a PIL image or a numpy array) or a list "
                        f"of them, got {type(images).__name__}" + (": pass a list" if isinstance(images, (dict, set, frozenset)) else ""))
    return ([images] if single else list(images)), single


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")


_MODES_LOCK = threading.Lock()


class eval_mode:
    """Context manager: eval mode inside; afterwards every submodule's own mode as it was (a model
    fine-tuned with frozen BatchNorm keeps it frozen). Nested or concurrent uses (threads predicting
    at once) share one switch: the first entry saves the modes, the last exit restores them, so no
    thread's pass runs in train mode because another one finished."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        with _MODES_LOCK:
            depth = self.module.__dict__.get("_eval_mode_depth", 0)
            if depth == 0:
                self.module.__dict__["_eval_mode_saved"] = [(m, m.training) for m in self.module.modules()]
                self.module.eval()
            self.module.__dict__["_eval_mode_depth"] = depth + 1
        return self.module

    def __exit__(self, *exc: Any) -> None:
        with _MODES_LOCK:
            self.module.__dict__["_eval_mode_depth"] -= 1
            if self.module.__dict__["_eval_mode_depth"] == 0:
                for module, training in self.module.__dict__.pop("_eval_mode_saved"):
                    module.training = training


def check_precision(precision: Any) -> None:
    if precision not in ("fp32", "bf16", "auto"):
        raise PrecisionError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")


def autocast_context(device: torch.device, precision: str):
    check_precision(precision)
    use_bf16 = choose_precision(device, precision).precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
