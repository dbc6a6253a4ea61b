"""chest-xray-classifier: a VGG19 chest X-ray classifier (Normal / Covid / Viral Pneumonia).

Research demo, not for clinical use.
"""
from .backbones import PretrainedWeightsUnavailable
from .config import ChestXrayConfig, ConfigError
from .errors import ChestModelError
from .explain import Explanation, explain_image, overlay
from .hub import HubUploadError, ModelLoadError
from .model import ChestXrayClassifier, Prediction
from .preprocess import IMAGE_EXTENSIONS, ImageLoadError, Preprocessor, load_image

__version__ = "0.1.0"

__all__ = [
    "ChestModelError",
    "ChestXrayClassifier",
    "ChestXrayConfig",
    "ConfigError",
    "Explanation",
    "HubUploadError",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ModelLoadError",
    "Preprocessor",
    "Prediction",
    "PretrainedWeightsUnavailable",
    "explain_image",
    "load_image",
    "overlay",
]
