"""The classifier: torchvision's VGG19 features + a small head. ``forward`` returns logits."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .backbones import FEATURE_CHANNELS, build_features, imagenet_features_state_dict, imagenet_weights_name
from .config import ChestXrayConfig
from .preprocess import ImageSource, Preprocessor

logger = logging.getLogger(__name__)


class ChestXrayClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="chest-xray-classifier",
    pipeline_tag="image-classification",
    license="mit",
    tags=["chest-x-ray", "medical-imaging", "vgg19", "research-only"],
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
        self.preprocessor = Preprocessor(config)

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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))

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
        ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the hardware runs it natively).

        Each result is a :class:`Prediction`: a plain ``dict`` of class → probability (summing to 1)
        that also carries an out-of-distribution check: ``.uncertain`` is True, ``.label`` is
        ``"uncertain"`` and ``.reasons`` says why, for inputs that do not look like chest X-rays
        (colour, blank or document-like images, or less confident than 98% of validation X-rays).
        """
        from .ood import ood_reasons

        single = not isinstance(images, (list, tuple))
        decoded = [self.preprocessor.load(x) for x in ([images] if single else images)]
        probs = self.predict_proba(decoded, batch_size=batch_size, precision=precision)
        results = []
        for image, row in zip(decoded, probs.tolist()):
            probabilities = dict(zip(self.class_names, map(float, row)))
            results.append(Prediction(probabilities, ood_reasons(image, probabilities, self.config)))
        return results[0] if single else results

    def analyze(self, images: ImageSource | Sequence[ImageSource], *, batch_size: int = 16, precision: str = "fp32"):
        """:meth:`predict` as plain records: ``{"label", "probabilities", "uncertain", "reasons"}``."""
        results = self.predict(images, batch_size=batch_size, precision=precision)
        records = [r.to_record() for r in (results if isinstance(results, list) else [results])]
        return records if isinstance(results, list) else records[0]

    def predict_proba(
        self, images: Iterable[ImageSource], *, batch_size: int = 16, precision: str = "fp32"
    ) -> torch.Tensor:
        """An ``(N, num_classes)`` float tensor of calibrated probabilities."""
        items = list(images)
        device = next(self.parameters()).device
        rows = []
        with eval_mode(self), torch.inference_mode():
            for start in range(0, len(items), batch_size):
                batch = torch.stack([self.preprocessor(self.preprocessor.load(x)) for x in items[start : start + batch_size]])
                rows.append(self.probabilities(batch.to(device), precision=precision).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.config.num_classes)

    def probabilities(self, pixel_values: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
        """Softmax of temperature-scaled logits for already-normalized inputs."""
        with autocast_context(pixel_values.device, precision):
            logits = self(pixel_values.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits.float() / self.config.temperature, dim=1)

    # -----------------------------------------------------------------------------------------
    # Saving and loading (see hub.py for why these replace the mixin's defaults)

    def save_pretrained(self, save_directory: str | Path, *, card_context: dict | None = None,
                        weights_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` (the model card) atomically."""
        from .hub import save_model_folder

        if kwargs.pop("push_to_hub", False):
            raise TypeError("use model.push_to_hub(repo_id) to upload")
        save_model_folder(self, save_directory, card_context=card_context, weights_dtype=weights_dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> ChestXrayClassifier:
        from .hub import load_model

        return load_model(cls, pretrained_model_name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from .hub import push_model

        return push_model(self, repo_id, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any):
        from .card import render_card

        return render_card(self.config, kwargs.get("card_context"))


class Prediction(dict):
    """Class → probability (a plain dict, summing to 1) with the out-of-distribution verdict."""

    def __init__(self, probabilities: dict[str, float], reasons: list[str] | None = None):
        super().__init__(probabilities)
        self.reasons = list(reasons or [])
        self.uncertain = bool(self.reasons)
        self.label = "uncertain" if self.uncertain else max(probabilities, key=probabilities.get)

    def to_record(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": dict(self), "uncertain": self.uncertain, "reasons": self.reasons}


class eval_mode:
    """Context manager: eval mode inside, the previous train/eval mode restored afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        self.was_training = self.module.training
        self.module.eval()
        return self.module

    def __exit__(self, *exc: Any) -> None:
        self.module.train(self.was_training)


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_context(device: torch.device, precision: str):
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_native(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
