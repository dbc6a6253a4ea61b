"""``chest-model space``: a folder that runs as a Hugging Face Space as it is.

    DIR/README.md         Space front matter (sdk: gradio at the installed version, app_file, licence...)
    DIR/app.py            the thin Gradio app (chest_model/space_app.py)
    DIR/requirements.txt  the package's inference requirements, with CPU-only torch
    DIR/chest_model/      this package, vendored: the Space runs the code that built it
    DIR/model/            a local model's config, weights, card and metrics (a Hub repo is named instead)
    DIR/examples/         example images

The folder is written atomically: a failed build leaves a previous one as it was.
"""
from __future__ import annotations

import logging
import re
import shutil
from importlib import metadata
from pathlib import Path

from .atomic import atomic_directory, file_above
from .card import DISTRIBUTION, LICENSE, repository_url
from .demo import NOTICE, example_files  # the page's own words and examples
from .errors import ChestModelError
from .hub import CARD_NAME, MODEL_FILES, ModelLoadError, looks_like_path

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_EXAMPLES = PACKAGE_DIR.parent / "examples"  # present in a source checkout, not in an installed wheel
DEFAULT_TITLE = "Chest X-ray classifier"
SHORT_DESCRIPTION = "VGG19 chest X-ray classifier. Research demo, not clinical."
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Besides the weights, what the demo reads from a model folder (the shortcut figure in metrics.json).
MODEL_EXTRAS = ("metrics.json", "eval/metrics.json")
MARKER = "written here by `chest-model space`"  # in app.py's docstring: a folder this command may replace

SPACE_README = """---
{{ card_data }}
---

# {{ title }}

{{ notice }}

Drop a chest X-ray (JPEG, PNG or DICOM): the page shows the probability of each class{% if class_names %}
({{ class_names | join(", ") }}){% endif %}, a Grad-CAM heat map of where the model looked, and, for
inputs the model cannot judge, "Uncertain" with the reasons.

- **Model:** {% if repo_id %}[{{ repo_id }}](https://huggingface.co/{{ repo_id }}){% if revision %} at `{{ revision }}`{% endif %}{% else %}`model/` in this Space; its card is [model/README.md](model/README.md){% endif %}
- **Code:** {% if repository_url %}{{ repository_url }}{% else %}the `chest-xray-classifier` package{% endif %} (version {{ version }}, vendored in `chest_model/`)
{% if examples_note %}- **Examples:** {{ examples_note }}
{% endif %}
Built with `chest-model space --model {{ repo_id or "MODEL" }} --output DIR`, and uploaded with
`hf upload --repo-type space USER/SPACE DIR .`. Run it locally from this folder with
`pip install -r requirements.txt gradio=={{ sdk_version }}` and `python app.py --port 7860`.

The `/predict` endpoint can be called from Python:

```python
from gradio_client import Client, handle_file

client = Client("USER/SPACE")
client.predict(handle_file("chest_xray.jpeg"), api_name="/predict")
```
"""


class SpaceError(ChestModelError, ValueError):
    """A Space that cannot be built as asked; the message says why."""


def build_space(model: str, output: str | Path, *, revision: str | None = None, examples: str | Path | None = None,
                title: str = DEFAULT_TITLE) -> Path:
    """Assemble the Space folder ``output`` for ``model`` (a local model folder or a Hub repo id)."""
    output = Path(output).expanduser().absolute()
    local = Path(model).expanduser()
    repo_id = None if local.is_dir() else _hub_repo_id(model)
    if repo_id is None and revision is not None:
        raise SpaceError(f"{model}: is a local folder, which has no revisions; --revision chooses a version of a Hub repo")
    if repo_id is not None and local.parent != Path(".") and local.parent.is_dir():
        logger.warning("%s: no such local folder (though %s is one), so the Space will download the Hub repo %s; "
                       "check the path if you meant a folder", model, local.parent, repo_id)
    config = _check_model(local) if repo_id is None else None
    examples_dir, examples_note = _examples(examples)
    sources = [PACKAGE_DIR] + ([local.resolve()] if repo_id is None else []) + ([examples_dir.resolve()] if examples_dir else [])
    _check_output(output, sources)
    gradio_version = _installed("gradio", "the demo extra: pip install 'chest-xray-classifier[demo]'")
    requirements = _requirements()

    # A rebuilt Space keeps its dot-entries (a clone's .git, .gitattributes); everything else is written anew.
    replaced = [entry.name for entry in output.iterdir() if not entry.name.startswith(".")] if output.is_dir() else []
    with atomic_directory(output, drop=replaced) as tmp:
        shutil.copytree(PACKAGE_DIR, tmp / "chest_model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (tmp / "app.py").write_text(_app_source(repo_id or "model", revision, repo_id or local.resolve().name), encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements, encoding="utf-8")
        if repo_id is None:
            _copy_model(local, tmp / "model")
        if examples_dir:
            (tmp / "examples").mkdir()
            for image in example_files(examples_dir):
                shutil.copy2(image, tmp / "examples" / image.name)
        (tmp / CARD_NAME).write_text(_readme(title, gradio_version, repo_id, revision, examples_note,
                                             config.class_names if config else None), encoding="utf-8")
    return output


def _hub_repo_id(model: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(model).expanduser().exists():
        raise SpaceError(f"{model}: is a file; pass the model folder that holds {', '.join(MODEL_FILES)}")
    if looks_like_path(model):
        raise SpaceError(f"{model}: no such model folder")
    try:
        validate_repo_id(model)
    except HFValidationError as err:
        raise SpaceError(f"{model}: neither a local folder nor a valid Hugging Face Hub repo id ({err})") from None
    return model


def _check_model(folder: Path):
    """Load the folder once, so a Space is never built around a model that cannot load."""
    from .model import ChestXrayClassifier

    try:
        return ChestXrayClassifier.from_pretrained(folder).config
    except ModelLoadError as err:
        raise SpaceError(str(err)) from None


def _examples(examples: str | Path | None) -> tuple[Path | None, str | None]:
    if examples is None:  # the project's own examples, when run from a checkout
        if CHECKOUT_EXAMPLES.is_dir():
            return CHECKOUT_EXAMPLES, ('three X-rays from the test split of the Kaggle "COVID-19 Image Dataset", compiled '
                                       "from the COVID-19 image data collection (Cohen et al., 2020) and the pediatric "
                                       "images of Kermany et al. (2018), downscaled")
        return None, None
    folder = Path(examples).expanduser()
    if not folder.is_dir():
        raise SpaceError(f"{examples}: no such folder of example images")
    return folder, None


def _check_output(output: Path, sources: list[Path]) -> None:
    for source in sources:
        if output == source or source in output.parents:
            raise SpaceError(f"{output}: is inside {source}, which the Space copies; choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise SpaceError(f"{output}: is a file; choose a new or empty folder")
    if (blocking := file_above(output)) is not None:
        raise SpaceError(f"{output}: {blocking} is a file, so no folder can be made below it")
    # A fresh clone of a new Space (its .git, .gitattributes and template README) counts as empty.
    if output.is_dir() and any(entry.name != CARD_NAME and not entry.name.startswith(".") for entry in output.iterdir()):
        app = output / "app.py"
        if not (app.is_file() and MARKER in app.read_text(encoding="utf-8", errors="replace")):
            raise SpaceError(f"{output}: exists and is not a Space built by `chest-model space`; "
                             "choose a new or empty folder (it would be replaced)")


def _installed(distribution: str, hint: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise SpaceError(f"building a Space needs {distribution} installed ({hint})") from None


def _requirements() -> str:
    """The package's own requirements without extras: what inference needs, nothing for training or tests."""
    _installed(DISTRIBUTION, "pip install the project first")
    base = [r for r in metadata.requires(DISTRIBUTION) or [] if "extra" not in r.partition(";")[2]]
    return "\n".join([
        "# What the Space needs to serve the model (the package's inference requirements).",
        "# gradio itself is installed by the Space, at README.md's sdk_version.",
        # CPU-only torch (a few hundred MB, not several GB): a free Space has no GPU to use CUDA wheels on.
        "# On GPU hardware, delete the next line so that pip installs a CUDA build of torch.",
        f"--extra-index-url {CPU_TORCH_INDEX}",
        *base,
    ]) + "\n"


def _app_source(model: str, revision: str | None, name: str) -> str:
    source = (PACKAGE_DIR / "space_app.py").read_text(encoding="utf-8")
    for setting, value in (("MODEL", model), ("REVISION", revision), ("MODEL_NAME", name)):
        source, count = re.subn(rf"^{setting} = \S+", lambda _: f"{setting} = {value!r}", source, count=1, flags=re.M)
        if count != 1:  # the template and this function are edited together; say so if they drift
            raise RuntimeError(f"{PACKAGE_DIR / 'space_app.py'} has no '{setting} = ...' line to fill in")
    return source


def _copy_model(folder: Path, target: Path) -> None:
    for relative in (*MODEL_FILES, *MODEL_EXTRAS):
        if (folder / relative).is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / relative, target / relative)


def _readme(title: str, sdk_version: str, repo_id: str | None, revision: str | None, examples_note: str | None,
            class_names: list[str] | None) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    from . import __version__

    data = SpaceCardData(title=title, sdk="gradio", sdk_version=sdk_version, app_file="app.py", license=LICENSE,
                         models=[repo_id] if repo_id else None, short_description=SHORT_DESCRIPTION,
                         emoji="🩻", pinned=False, tags=["medical-imaging", "chest-x-ray", "research-only"])
    card = SpaceCard.from_template(data, template_str=SPACE_README, title=title, repo_id=repo_id, revision=revision,
                                   repository_url=repository_url(), version=__version__, examples_note=examples_note,
                                   sdk_version=sdk_version, class_names=class_names, notice=NOTICE)
    return str(card).rstrip("\n") + "\n"
