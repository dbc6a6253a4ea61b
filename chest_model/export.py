"""ONNX export: the logits graph, with what a runtime needs to prepare its input in the metadata.

The graph takes ``pixel_values`` (float32, N x 3 x S x S, any N) already normalized as
``model.preprocessor`` does, and returns ``logits``. Probabilities are
``softmax(logits / temperature)``; ``class_names``, ``image_size``, ``mean``, ``std``,
``temperature`` and ``contrast`` are stored as JSON strings in the model's ``metadata_props``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ChestModelError
from .feature_ood import BUFFER_PREFIX
from .preprocess import CLAHE_CLIP, CLAHE_TILES, STANDARD_MEAN, STANDARD_STD

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install '.[export]' in a checkout (or 'chest-xray-classifier[export] @ git+<repository URL>')"
METADATA_KEYS = ("class_names", "image_size", "mean", "std", "temperature", "contrast")


class ExportError(ChestModelError, RuntimeError):
    """The model could not be exported (a missing package, or the exporter failed)."""


def onnx_metadata(config) -> dict[str, str]:
    """The preprocessing and calibration a runtime needs, each value a JSON string."""
    metadata = {key: json.dumps(getattr(config, key)) for key in METADATA_KEYS if hasattr(config, key)}
    # The constants of the per-image contrast step, so a runtime need not copy them from this package.
    if getattr(config, "contrast", "none") == "standardize":
        metadata["contrast_params"] = json.dumps({"mean": STANDARD_MEAN, "std": STANDARD_STD})
    elif getattr(config, "contrast", "none") == "clahe":
        metadata["contrast_params"] = json.dumps({"clip_limit": CLAHE_CLIP, "tile_grid": CLAHE_TILES})
    elif getattr(config, "contrast", "none") == "equalize":
        metadata["contrast_params"] = json.dumps({})  # OpenCV's equalizeHist has no parameters
    return metadata


def _require_onnx(*, exporter: bool = True):
    try:
        import onnx

        if exporter:
            import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as err:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({err.name} is missing): {INSTALL_HINT}") from None
    return onnx


def export_onnx(model, output: str | Path) -> Path:
    """Write ``model`` as an ONNX file (weights inside, one file) atomically; returns its path."""
    from .atomic import atomic_write_bytes, check_writable_file
    from .model import eval_mode

    # before the export, which takes seconds; never into the model's own folder (its weights, its config)
    output = check_writable_file(output, input_folders=(model.folder,) if getattr(model, "folder", None) else ())
    onnx = _require_onnx()
    size = model.config.image_size
    weights = next(model.parameters())
    if weights.dtype != torch.float32 or weights.device.type != "cpu":
        # The graph takes fp32 on every runtime: trace an fp32 copy on the CPU, whatever this model is
        # cast to or placed on (the model itself is left as it is; no second copy on its GPU).
        state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu() for k, v in model.state_dict().items()}
        fp32_model = type(model)(model.config)
        if hasattr(model, f"{BUFFER_PREFIX}scale"):
            fp32_model._register_feature_buffers()
        fp32_model.load_state_dict(state)
        model = fp32_model.eval()
    example = torch.zeros(2, 3, size, size)  # batch 2: the batch axis must not be traced as 1
    try:
        with eval_mode(model):
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
                dynamo=True, external_data=False, verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"ONNX export failed: {err}") from err
    proto = program.model_proto
    for key, value in onnx_metadata(model.config).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "Chest X-ray classifier. Research demo, not for clinical use. probabilities = softmax(logits / temperature)"
    onnx.checker.check_model(proto)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, proto.SerializeToString())
    return output


def read_metadata(path: str | Path) -> dict:
    """An exported model's metadata, with its JSON values decoded."""
    onnx = _require_onnx(exporter=False)
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: json.loads(entry.value) for entry in proto.metadata_props}
