"""The Gradio demo: upload an X-ray, see class probabilities and a Grad-CAM map. ``demo/app.py`` is a thin launcher.

Uploads are decoded with :func:`chest_model.load_image` (not Gradio's Pillow path, which clips
16-bit images and cannot read DICOM). Errors reach the user as ``gr.Error`` with the reason and the
server keeps serving.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .data import is_image_file
from .explain import ExplainError, explain_image, overlay
from .hub import CARD_NAME
from .metrics import called_as
from .model import ChestXrayClassifier
from .preprocess import ImageLoadError, contrast_step, file_format, header_size, load_image

logger = logging.getLogger(__name__)

NOTICE = "**Research demo, not for clinical use.** Do not use it to diagnose, triage or treat anyone."
UNCERTAIN = "Uncertain"


def shortcut_caveat(metadata_accuracy: float | None) -> str:
    """The dataset-shortcut warning, with the model's own measured figure when its folder has one."""
    figure = (f"scores {metadata_accuracy:.0%} on its test split" if metadata_accuracy is not None
              else "scores far above chance on its test split")
    return (
        "The public dataset behind this model has a known shortcut: its Covid images are adults' (often portable "
        "films), its Normal and Viral Pneumonia images children's, and they differ in size, aspect ratio and "
        f"exposure. A classifier that never looks at a pixel, only at each file's size and format, {figure}. "
        "High scores can mean the model recognises the *source*, not the disease; the heat map shows where it "
        "looked. Viral Pneumonia was learned from children's X-rays only."
    )


def short_caveat(metadata_accuracy: float | None, unseen_normals_called_covid: float | None = None,
                 cropped_normals_called_covid: float | None = None, covid_called_normal: tuple[int, int] | None = None) -> str:
    figure = f"about {metadata_accuracy:.0%} of the time" if metadata_accuracy is not None else "far above chance"
    unseen = (f" Trained the same way without one adult-normal source, it called up to {unseen_normals_called_covid:.0%} "
              "of that source's normal adult X-rays Covid: a Covid call on an adult film from elsewhere is weak evidence."
              if unseen_normals_called_covid is not None else "")
    cropped = (f" Cropped to {FRAMING_SHOWN} around their centre, up to {cropped_normals_called_covid:.0%} of a group of "
               "normal films it had not trained on were called Covid: how tightly a film is framed can decide its answer."
               if cropped_normals_called_covid is not None else "")
    missed = (f" On its test split it called {covid_called_normal[0]} of the {covid_called_normal[1]} Covid films Normal: "
              "a Normal answer does not rule Covid out." if covid_called_normal and covid_called_normal[0] else "")
    return (f"⚠️ On the public dataset behind this model, the files' size, shape and format alone, without a pixel, "
            f"predict the class {figure}, so a high score may reflect the image's source rather than the lungs.{unseen}{cropped}{missed} See *About this model*.")


# For a model the card cannot tie to the tutorial's dataset (chest_model.card.tutorial_data_possible).
GENERIC_CAVEAT = ("A classifier can learn where its images came from (hospital, scanner, patients' age) instead of "
                  "the disease. Check that every class's training images come from several sources; the heat map "
                  "shows where this model looked.")


def tutorial_caveats_apply(model: ChestXrayClassifier) -> bool:
    """Whether the tutorial dataset's caveats describe this model, as its card decides."""
    from .card import card_context_from_folder, training_sources, tutorial_data_possible

    folder = getattr(model, "folder", None)
    try:
        context = card_context_from_folder(folder) if folder else {}
    except (OSError, ValueError):  # unreadable records: when in doubt, warn
        context = {}
    return tutorial_data_possible(training_sources(context), model.class_names)


DEFAULT_MAX_FILE_SIZE = "50mb"


def example_files(examples_dir: Path | None) -> list[Path]:
    """The images the page offers as examples (and a Space copies): the folder's own, not its notes or hidden files."""
    if not examples_dir or not Path(examples_dir).is_dir():
        return []
    # By content too, not name alone: a page must not offer a text file called .png as an example X-ray.
    return sorted(p for p in Path(examples_dir).iterdir() if is_image_file(p) and file_format(p) is not None)


class DemoService:
    """The model and the three things the UI needs from it.

    Each upload is decoded once: the label, its heat map and every heat map for another class read
    the same decoded pixels, kept for the last few uploads (keyed by the file's path, size and time)
    within a memory budget.
    """

    DECODED_UPLOADS = 8  # a few per concurrent request
    DECODED_BYTES = 256 * 2**20  # large PNGs and DICOMs decode at full size (up to 600 MB for 200 MP)

    def __init__(self, model: ChestXrayClassifier, model_ref: str, revision: str | None = None, precision: str = "auto"):
        self.model = model.eval()
        self.model_ref = model_ref
        self.revision = revision
        # bf16 where it is faster than fp32 (chest_model.precision): checked against fp32 on real X-rays
        # (same top class, probabilities within 0.02; tests/test_model.py, docs/benchmarks.md).
        self.precision = precision
        self._decoded: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: str | None, *, shown_min_side: int | None = None) -> np.ndarray:
        """The upload decoded as RGB uint8 (read-only: requests for the same file share it), as the model
        reads it, or, to show it, with its shorter side at ``shown_min_side`` or more (a JPEG's reduced
        decode, else the file's own size)."""
        import gradio as gr

        if not path:
            raise gr.Error("Upload a chest X-ray first (JPEG, PNG or DICOM).", print_exception=False)
        try:
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns, shown_min_side)
        except FileNotFoundError:  # Gradio serves only its own uploads: this one was swept from its cache
            raise gr.Error("This upload is no longer on the server (uploads are kept for an hour); upload the "
                           "file again.", title="Upload expired", print_exception=False) from None
        except OSError:
            key = None  # the decoder names what is wrong with it
        with self._lock:
            if key in self._decoded:
                self._decoded.move_to_end(key)
                return self._decoded[key]
        try:
            if shown_min_side is None:
                image = self.model.preprocessor.load(path, name=Path(path).name)
            else:
                image = load_image(path, name=Path(path).name, min_size=shown_min_side)
        except ImageLoadError as err:
            raise gr.Error(str(err), title="Cannot read this file", print_exception=False) from None
        image.flags.writeable = False
        if key is not None and image.nbytes <= self.DECODED_BYTES:
            with self._lock:
                self._decoded[key] = image
                while len(self._decoded) > self.DECODED_UPLOADS or \
                        sum(cached.nbytes for cached in self._decoded.values()) > self.DECODED_BYTES:
                    self._decoded.popitem(last=False)
        return image

    def predict_with_warning(self, path: str | None):
        """The label, the out-of-distribution warning and the top class, all from one forward pass."""
        prediction = self.model.predict(self.load(path), precision=self.precision)
        return label_value(prediction), warning_markdown(prediction.reasons), max(prediction, key=prediction.get)

    def explain(self, path: str | None, target: str, opacity: float, predicted: str | None = None):
        """Grad-CAM overlay and the state to re-blend it. For "Predicted class" the map explains
        ``predicted``, the class the label shows, where the page has it (an API call has not)."""
        import gradio as gr

        chosen = (predicted if predicted in self.model.class_names else None) if target in (None, "", PREDICTED) else target
        decoded = self.load(path)
        try:
            result = explain_image(self.model, decoded, chosen)
        except ExplainError as err:
            raise gr.Error(str(err), title="No heat map", print_exception=False) from None
        image, heatmap = display_size(self.film_to_show(path, decoded), result.heatmap)
        state = {"image": image, "heatmap": heatmap, "target": result.target_class}
        return overlay(image, heatmap, opacity), state

    def film_to_show(self, path: str, decoded: np.ndarray) -> np.ndarray:
        """The film for the page at its own resolution, up to :data:`DISPLAY_SIDE`: the model's decode
        where that is the file's size; a JPEG the model read at reduced scale (its input is far smaller)
        is decoded again, at the smallest DCT scale that still fills the page's size."""
        import gradio as gr

        try:
            if file_format(path) != "JPEG":
                return decoded
            width, height = header_size(path, "JPEG", Path(path).name)
            if max(width, height) <= max(decoded.shape[:2]):
                return decoded
            # long side / scale >= DISPLAY_SIDE  <=>  short side / scale >= this
            return self.load(path, shown_min_side=math.ceil(DISPLAY_SIDE * min(width, height) / max(width, height)))
        except (OSError, ImageLoadError, gr.Error):
            return decoded  # the model's decode read it; show that

    @staticmethod
    def reblend(state: dict[str, Any] | None, opacity: float):
        if not state:
            return None
        return overlay(state["image"], state["heatmap"], opacity)

    def model_panel(self) -> str:
        return model_panel_markdown(self.model, self.model_ref, self.revision)


PREDICTED = "Predicted class"
# The overlay is shown on a page: larger films are shrunk to this longest side for it (a browser
# shows no more, WebP stops at 16383 px, and each session keeps the overlay's state).
DISPLAY_SIDE = 2048


def display_size(image: np.ndarray, heatmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The film shrunk to at most :data:`DISPLAY_SIDE` on its longest side, and its heat map (of any
    size: the map of a reduced decode) brought to the film's shown size."""
    import cv2

    height, width = image.shape[:2]
    scale = min(1.0, DISPLAY_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if heatmap.shape[:2] != image.shape[:2]:
        shrink = heatmap.shape[1] > size[0]
        heatmap = cv2.resize(heatmap, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image, heatmap


def label_value(prediction):
    """What the Label shows: the class probabilities, or "Uncertain" on top of them for a flagged input."""
    if not prediction.uncertain:
        return dict(prediction)
    from gradio.components.label import LabelConfidence, LabelData

    ranked = sorted(prediction.items(), key=lambda item: item[1], reverse=True)
    return LabelData(label=UNCERTAIN, confidences=[LabelConfidence(label=k, confidence=v) for k, v in ranked])


HEAT_TITLE = "Where the model looked (Grad-CAM)"


def heat_title(state: dict[str, Any] | None):
    """The heat map's title names the class it explains: for an input flagged Uncertain, or a class
    picked in the dropdown, that is not the label shown above it."""
    import gradio as gr

    target = (state or {}).get("target")
    return gr.update(label=f"Where the model looked for {target} (Grad-CAM)" if target else HEAT_TITLE)


def clear_results():
    """Empty label, warning, heat map (and its title) and states: what the page shows before a file's results arrive."""
    import gradio as gr

    return None, "", gr.update(value=None, label=HEAT_TITLE), None, None, None


def require_upload(path: str | None) -> None:
    """Stops the page's chain quietly when the upload box was cleared (the API still says what is missing)."""
    import gradio as gr

    if not path:
        raise gr.Error("no file", visible=False, print_exception=False)


def warning_markdown(reasons: list[str]) -> str:
    if not reasons:
        return ""
    return ("### ⚠️ Uncertain: this may not be a chest X-ray the model can judge\n" + "\n".join(f"- {r}" for r in reasons)
            + "\n\nThe class probabilities are shown for transparency; they are not meaningful for this input.")


def _folder_json(model: ChestXrayClassifier, relative: str) -> dict | None:
    """A JSON object from the model's folder, or None where there is none (or it is not one)."""
    folder = getattr(model, "folder", None)
    path = Path(folder) / relative if folder else None
    if not (path and path.is_file()):
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _measured_metrics(model: ChestXrayClassifier) -> dict:
    """The model folder's measured figures (metrics.json, or eval/metrics.json of a training run), or {}."""
    for relative in ("metrics.json", "eval/metrics.json"):
        metrics = _folder_json(model, relative)
        if metrics is not None:
            return metrics
    return {}


def metadata_baseline_accuracy(model: ChestXrayClassifier) -> float | None:
    """The shortcut figure measured for this model, if any."""
    audit = _measured_metrics(model).get("audit")
    value = audit.get("metadata_baseline_accuracy") if isinstance(audit, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def unseen_normals_called_covid(model: ChestXrayClassifier) -> float | None:
    """The largest share of a left-out, all-Normal source called Covid (leave-one-source-out runs), if measured."""
    external = _measured_metrics(model).get("external")
    try:
        shares = [float(row["predicted_share"]["Covid"]) for row in external.values() if set(row["true_counts"]) == {"Normal"}]
    except (AttributeError, KeyError, TypeError, ValueError):  # no such record, or not one this version wrote
        return None
    return max(shares) if shares else None


def covid_called_normal(model: ChestXrayClassifier) -> tuple[int, int] | None:
    """(Covid films called Normal, Covid films) on the model's measured test split, if measured."""
    return called_as(_measured_metrics(model), "Covid", "Normal")


FRAMING_SHOWN = "80% of each side"  # the framing check's crop the caveat quotes (chest_model.framing)


def cropped_normals_called_covid(model: ChestXrayClassifier) -> float | None:
    """The largest share of a group of normal films called Covid once cropped (the framing check its card
    was rendered with, else its evaluation's), if measured."""
    check = _card_context(model).get("framing_check") or (_measured_metrics(model).get("audit") or {}).get("framing")
    try:
        shares = [float(row["framings"][FRAMING_SHOWN]["called"]["Covid"]) for group, row in check["groups"].items()
                  if group.rpartition(" / ")[2] == "Normal"]
    except (AttributeError, KeyError, TypeError, ValueError):  # no such record, or not one this version wrote
        return None
    return max(shares) if shares else None


def _card_context(model: ChestXrayClassifier) -> dict:
    """What the model folder's card was rendered from (card_context.json), or {}."""
    return _folder_json(model, "card_context.json") or {}


def input_description(config) -> str:
    step = contrast_step(config.contrast)
    return f"{config.image_size}×{config.image_size} px" + (f", {step}" if step else "")


def model_panel_markdown(model: ChestXrayClassifier, model_ref: str, revision: str | None) -> str:
    config = model.config
    lines = [
        f"**Model:** `{display_name(model_ref)}`" + (f" @ `{revision}`" if revision else ""),
        f"**Classes:** {', '.join(config.class_names)}  ",
        f"**Input:** {input_description(config)}; backbone `{config.backbone}`, initialised from: {config.backbone_init}",
        "",
    ]
    card = _read_card(model)
    for title in ("Training data", "Evaluation"):
        section = _card_section(card, title) if card else None
        lines += [f"#### {title} (from the model card)", section or "_Not recorded in this model's card._", ""]
    caveat = shortcut_caveat(metadata_baseline_accuracy(model)) if tutorial_caveats_apply(model) else GENERIC_CAVEAT
    lines += [NOTICE, "", caveat]
    return "\n".join(lines)


def display_name(model_ref: str) -> str:
    """A Hub id as is; a local folder by its name only, so the page shows no path of the serving machine."""
    path = Path(model_ref).expanduser()
    return path.name if path.is_absolute() or path.is_dir() else str(model_ref)


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


def accept_label_data(label) -> None:
    """Let this gr.Label also take a ready LabelData, so "Uncertain" can head every class's confidence.

    Set on the instance: subclassing a Gradio component writes a .pyi stub next to the module.
    """
    from gradio.components.label import LabelData

    original = label.postprocess
    label.postprocess = lambda value: value if isinstance(value, LabelData) else original(value)


def build_demo(model: ChestXrayClassifier, model_ref: str, *, revision: str | None = None, examples_dir: Path | None = None):
    import gradio as gr

    service = DemoService(model, model_ref, revision)
    examples = [str(p) for p in example_files(examples_dir)]
    # Remove uploads from the cache: check every 10 minutes, delete what is older than an hour.
    with gr.Blocks(title="Chest X-ray classifier (research demo)", delete_cache=(600, 3600)) as demo:
        caveat = (short_caveat(metadata_baseline_accuracy(model), unseen_normals_called_covid(model),
                               cropped_normals_called_covid(model), covid_called_normal(model))
                  if tutorial_caveats_apply(model) else "⚠️ " + GENERIC_CAVEAT)
        gr.Markdown("# Chest X-ray classifier\n" + NOTICE + "\n\n" + caveat)
        with gr.Row():
            with gr.Column(scale=1):
                # No file_types filter: DICOM files often have no extension. The decoder checks content.
                upload = gr.File(label="Chest X-ray: drop a JPEG, PNG or DICOM file here, or click to upload",
                                 type="filepath", elem_id="xray-upload")
                if examples:
                    shown = gr.Examples(examples=examples, inputs=upload, label="Examples (from the dataset's test split)")
                    keep_examples_in_cache(shown, upload)
                target = gr.Dropdown([PREDICTED, *model.class_names], value=PREDICTED, label="Explain which class")
                opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Heat-map opacity")
            with gr.Column(scale=1):
                warning = gr.Markdown(elem_id="ood-warning")
                label = gr.Label(label="Class probabilities", elem_id="probabilities")
                accept_label_data(label)
                heat = gr.Image(label=HEAT_TITLE, type="numpy", interactive=False, elem_id="gradcam")
                gr.Markdown("_The heat map shows which regions raised the chosen class's score most, relative to the "
                            "rest of the film (cold regions may have raised it too). It is not a diagnosis; bright areas "
                            "outside the lungs (labels, borders, devices) suggest a shortcut._")
        with gr.Accordion("About this model", open=True):
            gr.Markdown(service.model_panel(), elem_id="model-panel")
        state, pending_warning, predicted = gr.State(), gr.State(), gr.State()

        # Every new upload first clears the last file's results, so a file that cannot be read (or a
        # cleared upload box) never leaves another file's label, warning or heat map on the page.
        # States stay out of the API: /predict returns the label alone, the page also gets the warning
        # and the top class, which its heat map then explains.
        # The model's passes share one concurrency limit (the queue's default): Gradio limits each
        # listener on its own, which would let /predict, /explain and a class change each run that many.
        upload.change(clear_results, None, [label, warning, heat, state, pending_warning, predicted],
                      api_visibility="private", queue=False).then(
            require_upload, upload, None, api_visibility="private", queue=False).success(
            service.predict_with_warning, upload, [label, pending_warning, predicted], api_name="predict",
            concurrency_id=MODEL_PASSES).success(
            lambda text: text, pending_warning, warning, api_visibility="private", queue=False).success(
            service.explain, [upload, target, opacity, predicted], [heat, state], api_name="explain",
            concurrency_id=MODEL_PASSES).success(
            heat_title, state, heat, api_visibility="private", queue=False)
        target.change(require_upload, upload, None, api_visibility="private", queue=False).success(
            service.explain, [upload, target, opacity, predicted], [heat, state], api_visibility="private",
            concurrency_id=MODEL_PASSES).success(
            heat_title, state, heat, api_visibility="private", queue=False)
        opacity.release(service.reblend, [state, opacity], heat, api_visibility="private", queue=False)
    return demo


MODEL_PASSES = "model"


def keep_examples_in_cache(examples, component) -> None:
    """Mark the example files' cached copies as kept: Gradio copies them once, at start, and its
    hourly sweep of old uploads (``delete_cache``) would otherwise delete them, breaking every example."""
    def paths(value):
        if isinstance(value, dict):
            if isinstance(value.get("path"), str):
                yield value["path"]
            for item in value.values():
                yield from paths(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from paths(item)
        elif isinstance(getattr(value, "path", None), str):
            yield value.path

    for processed in examples.non_none_processed_examples.values():
        component.keep_in_cache.update(paths(processed))


def launch_options(examples_dir: Path | None, max_file_size: str | int = DEFAULT_MAX_FILE_SIZE) -> dict[str, Any]:
    return {
        "max_file_size": max_file_size,
        "allowed_paths": [str(examples_dir)] if examples_dir else [],
        "footer_links": ["api"],
        "show_error": True,
    }


def file_size_argument(text: str) -> str:
    """An argparse type for ``--max-file-size``: a whole number with a unit, checked before the model loads."""
    import argparse

    if not re.fullmatch(r"\s*\d+\s*(b|kb|mb|gb|tb)\s*", text, flags=re.I):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file size; write a whole number and a unit, e.g. 50mb or 1gb")
    return text.replace(" ", "").lower()


def serve(create, *, host: str, port: int, examples_dir: Path | None, max_file_size: str) -> None:
    """Build the demo with ``create()`` and launch it. A model that cannot be found or loaded, a port in
    use or a host that cannot be bound: one ``error:`` line and status 2."""
    import sys

    from .errors import ChestModelError

    try:
        app = create()
    except ChestModelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        app.launch(server_name=host, server_port=port, **launch_options(examples_dir, max_file_size))
    except OSError as err:
        print(f"error: cannot serve on {host}:{port}: {err}", file=sys.stderr)
        sys.exit(2)


def configure_queue(demo, *, concurrency: int | None = None, max_size: int = 64):
    # CPU inference: a couple of requests at a time keep both cores busy; the rest wait in a bounded queue.
    concurrency = concurrency or int(os.environ.get("CHEST_DEMO_CONCURRENCY", "2"))
    return demo.queue(default_concurrency_limit=concurrency, max_size=max_size)
