"""The Gradio demo: upload an X-ray, see class probabilities and a Grad-CAM map. ``demo/app.py`` is a thin launcher.

Uploads are decoded with :func:`chest_model.load_image` (not Gradio's Pillow path, which clips
16-bit images and cannot read DICOM). Errors reach the user as ``gr.Error`` with the reason and the
server keeps serving.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .explain import explain_image, overlay
from .hub import CARD_NAME
from .model import ChestXrayClassifier
from .ood import ood_reasons
from .preprocess import ImageLoadError

logger = logging.getLogger(__name__)

NOTICE = "**Research demo, not for clinical use.** Do not use it to diagnose, triage or treat anyone."
SHORTCUT_CAVEAT = (
    "The public dataset behind this model has a known shortcut: its Covid images come from other sources than "
    "its Normal and Viral Pneumonia images, and differ in size, aspect ratio and exposure. A classifier that "
    "never looks at a pixel, only at each file's size and format, scores about 89% on its test split. High "
    "scores here can mean the model recognises the *source*, not the disease; the heat map shows where it looked."
)
SHORT_CAVEAT = (
    "⚠️ On the public dataset it was trained on, file size and source alone predict the class about 89% of "
    "the time, so a high score may reflect the image's source rather than the lungs. See *About this model*."
)
DEFAULT_MAX_FILE_SIZE = "50mb"


class DemoService:
    """The model and the three things the UI needs from it."""

    def __init__(self, model: ChestXrayClassifier, model_ref: str, revision: str | None = None, precision: str = "auto"):
        self.model = model.eval()
        self.model_ref = model_ref
        self.revision = revision
        # bf16 where the hardware runs it natively: checked against fp32 on real X-rays
        # (same top class, probabilities within 0.02; tests/test_model.py, docs/benchmarks.md).
        self.precision = precision

    def _load(self, path: str | None) -> np.ndarray:
        import gradio as gr

        if not path:
            raise gr.Error("Upload a chest X-ray first (JPEG, PNG or DICOM).")
        try:
            return self.model.preprocessor.load(path, name=Path(path).name)
        except ImageLoadError as err:
            raise gr.Error(str(err), title="Cannot read this file") from None

    def predict(self, path: str | None) -> dict[str, float]:
        """Class → probability for one uploaded file (the public ``/predict`` endpoint)."""
        return self.model.predict(self._load(path), precision=self.precision)

    def predict_batch(self, paths: list[str | None]) -> list[list[dict[str, float]]]:
        """Gradio's batched form of :meth:`predict` (one forward pass for a whole queue batch).

        Only for measuring: a bad file raises and fails every request in its batch, which is why
        the public endpoint is not batched (docs/benchmarks.md).
        """
        images = [self._load(path) for path in paths]
        return [self.model.predict(images, precision=self.precision)]

    def explain(self, path: str | None, target: str, opacity: float) -> tuple[np.ndarray, dict[str, Any], str]:
        """Grad-CAM overlay, the state to re-blend it, and the out-of-distribution warning (if any)."""
        image = self._load(path)
        result = explain_image(self.model, image, None if target in (None, "", PREDICTED) else target)
        state = {"image": result.image, "heatmap": result.heatmap, "target": result.target_class}
        reasons = ood_reasons(result.image, result.probabilities, self.model.config)
        warning = ("### ⚠️ Uncertain: this may not be a chest X-ray\n" + "\n".join(f"- {r}" for r in reasons)
                   + "\n\nThe class probabilities above are not meaningful for it.") if reasons else ""
        return overlay(result.image, result.heatmap, opacity), state, warning

    @staticmethod
    def reblend(state: dict[str, Any] | None, opacity: float):
        if not state:
            return None
        return overlay(state["image"], state["heatmap"], opacity)

    def model_panel(self) -> str:
        return model_panel_markdown(self.model, self.model_ref, self.revision)


PREDICTED = "Predicted class"


def model_panel_markdown(model: ChestXrayClassifier, model_ref: str, revision: str | None) -> str:
    config = model.config
    lines = [
        f"**Model:** `{model_ref}`" + (f" @ `{revision}`" if revision else ""),
        f"**Classes:** {', '.join(config.class_names)}  ",
        f"**Input:** {config.image_size}×{config.image_size} px, backbone `{config.backbone}`, initialised from: {config.backbone_init}",
        "",
    ]
    card = _read_card(model)
    for title in ("Training data", "Evaluation"):
        section = _card_section(card, title) if card else None
        lines += [f"#### {title} (from the model card)", section or "_Not recorded in this model's card._", ""]
    lines += [NOTICE, "", SHORTCUT_CAVEAT]
    return "\n".join(lines)


def _read_card(model: ChestXrayClassifier) -> str | None:
    folder = getattr(model, "folder", None)
    if folder and (Path(folder) / CARD_NAME).is_file():
        return (Path(folder) / CARD_NAME).read_text(encoding="utf-8")
    return None


def _card_section(card: str, title: str) -> str | None:
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", card, flags=re.M | re.S)
    if not match:
        return None
    # Sub-headings become bold lines so they do not outrank the panel's own headings.
    return re.sub(r"^#{3,} (.*)$", r"**\1**", match.group(1).strip(), flags=re.M)


def build_demo(model: ChestXrayClassifier, model_ref: str, *, revision: str | None = None, examples_dir: Path | None = None):
    import gradio as gr

    service = DemoService(model, model_ref, revision)
    examples = sorted(str(p) for p in examples_dir.glob("*") if p.is_file()) if examples_dir and examples_dir.is_dir() else []
    # Remove uploads from the cache: check every 10 minutes, delete what is older than an hour.
    with gr.Blocks(title="Chest X-ray classifier (research demo)", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# Chest X-ray classifier\n" + NOTICE + "\n\n" + SHORT_CAVEAT)
        with gr.Row():
            with gr.Column(scale=1):
                # No file_types filter: DICOM files often have no extension. The decoder checks content.
                upload = gr.File(label="Chest X-ray: drop a JPEG, PNG or DICOM file here, or click to upload",
                                 type="filepath", elem_id="xray-upload")
                if examples:
                    gr.Examples(examples=examples, inputs=upload, label="Examples (from the dataset's test split)")
                target = gr.Dropdown([PREDICTED, *model.class_names], value=PREDICTED, label="Explain which class")
                opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Heat-map opacity")
            with gr.Column(scale=1):
                warning = gr.Markdown(elem_id="ood-warning")
                label = gr.Label(num_top_classes=len(model.class_names), label="Class probabilities", elem_id="probabilities")
                heat = gr.Image(label="Where the model looked (Grad-CAM)", type="numpy", interactive=False, elem_id="gradcam")
                gr.Markdown("_The heat map shows which regions raised the chosen class's score. It is not a diagnosis; "
                            "bright areas outside the lungs (labels, borders, devices) suggest a shortcut._")
        with gr.Accordion("About this model", open=True):
            gr.Markdown(service.model_panel(), elem_id="model-panel")
        state = gr.State()

        upload.change(service.predict, upload, label, api_name="predict").then(
            service.explain, [upload, target, opacity], [heat, state, warning], api_name="explain")
        if os.environ.get("CHEST_DEMO_BATCH_ENDPOINT") == "1":  # benchmark only, see predict_batch
            batch_button = gr.Button(visible=False)
            batch_button.click(service.predict_batch, upload, label, api_name="predict_batch", batch=True, max_batch_size=8)
        target.change(service.explain, [upload, target, opacity], [heat, state, warning], api_visibility="private")
        opacity.release(service.reblend, [state, opacity], heat, api_visibility="private", queue=False)
    return demo


def launch_options(examples_dir: Path | None, max_file_size: str | int = DEFAULT_MAX_FILE_SIZE) -> dict[str, Any]:
    return {
        "max_file_size": max_file_size,
        "allowed_paths": [str(examples_dir)] if examples_dir else [],
        "footer_links": ["api"],
        "show_error": True,
    }


def configure_queue(demo, *, concurrency: int | None = None, max_size: int = 64):
    # CPU inference: a couple of requests at a time keep both cores busy; the rest wait in a bounded queue.
    concurrency = concurrency or int(os.environ.get("CHEST_DEMO_CONCURRENCY", "2"))
    return demo.queue(default_concurrency_limit=concurrency, max_size=max_size)
