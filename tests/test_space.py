"""`chest-model space`: a folder that runs as a Hugging Face Space as it is, started from that folder."""
import os
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

from chest_model import ChestXrayClassifier
from chest_model.cli import main
from chest_model.space import SpaceError, build_space
from helpers import EXAMPLES, free_port, wait_for_server

CLASSES = {"Normal", "Covid", "Viral Pneumonia"}
NOT_FOR_A_SPACE = {"accelerate", "scikit-learn", "matplotlib", "pytest", "pytest-timeout", "playwright", "scikit-image",
                   "onnx", "onnxruntime"}
BLOCKED_IN_A_SPACE = {"accelerate", "sklearn", "matplotlib", "pytest", "playwright", "skimage", "onnx", "onnxruntime"}


def _front_matter(readme: str) -> dict:
    _, meta, _ = readme.split("---", 2)
    return yaml.safe_load(meta)


def _requirement_names(text: str) -> set[str]:
    import re

    return {re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0].lower().replace("_", "-")
            for line in text.splitlines() if line and not line.startswith(("#", "-"))}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-model"
    ChestXrayClassifier(image_size=32, hidden_size=8).save_pretrained(folder)
    (folder / "history.json").write_text("[]")  # a training run's other files stay out of the Space
    return folder


@pytest.fixture(scope="module")
def space(saved_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "space"
    assert main(["space", "--model", str(saved_model), "--output", str(out)]) == 0
    return out


def test_space_folder_holds_app_requirements_package_model_and_examples(space, saved_model):
    assert {p.name for p in space.iterdir()} == {"README.md", "app.py", "requirements.txt", "chest_model", "model", "examples"}
    assert sorted(p.name for p in (space / "examples").iterdir()) == sorted(p.name for p in EXAMPLES.glob("*.jpeg"))
    assert {p.name for p in (space / "model").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert (space / "model" / "model.safetensors").read_bytes() == (saved_model / "model.safetensors").read_bytes()
    assert (space / "chest_model" / "__init__.py").is_file() and (space / "chest_model" / "model_card.md").is_file()
    assert not list(space.rglob("__pycache__")) and not list(space.rglob("*.pyc"))


def test_front_matter_is_a_gradio_space_at_the_installed_version(space):
    meta = _front_matter((space / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == metadata.version("gradio")
    assert meta["app_file"] == "app.py" and (space / meta["app_file"]).is_file()
    assert meta["title"] and meta["license"] == "mit"
    assert 0 < len(meta["short_description"]) <= 60  # the Hub's limit
    assert "models" not in meta  # the model lives in the Space, not on the Hub
    assert "not for clinical use" in (space / "README.md").read_text().lower()


def test_requirements_are_cpu_torch_and_inference_only(space):
    text = (space / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text.splitlines()
    names = _requirement_names(text)
    assert {"torch", "torchvision", "safetensors", "huggingface-hub", "pydicom"} <= names
    assert not names & NOT_FOR_A_SPACE, names & NOT_FOR_A_SPACE


def test_a_hub_repo_is_named_not_copied(tmp_path):
    out = build_space("me/chest-xray", tmp_path / "space", revision="v1")
    meta = _front_matter((out / "README.md").read_text())
    assert meta["models"] == ["me/chest-xray"]
    assert not (out / "model").exists()
    app = (out / "app.py").read_text()
    assert "MODEL = 'me/chest-xray'" in app and "REVISION = 'v1'" in app


def test_rebuilding_replaces_a_space_but_never_another_folder(saved_model, tmp_path):
    out = build_space(str(saved_model), tmp_path / "space")
    (out / "stale.txt").write_text("from an earlier build")
    build_space(str(saved_model), out)
    assert not (out / "stale.txt").exists()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(SpaceError, match="not a Space built by"):
        build_space(str(saved_model), precious)
    assert (precious / "thesis.tex").read_text() == "keep me"
    with pytest.raises(SpaceError, match="inside"):
        build_space(str(saved_model), saved_model / "space")
    with pytest.raises(SpaceError, match="no such model folder"):
        build_space(str(tmp_path / "missing"), tmp_path / "other")


def test_a_broken_model_folder_is_refused_before_anything_is_written(saved_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((saved_model / "config.json").read_text())
    assert main(["space", "--model", str(broken), "--output", str(tmp_path / "space")]) == 2
    assert not (tmp_path / "space").exists()


@pytest.mark.server
@pytest.mark.slow
def test_the_space_runs_from_its_folder_and_serves_predict(space):
    from gradio_client import Client, handle_file

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    # app.py builds the demo from the vendored copy of the package, not the installed one, and with
    # nothing that requirements.txt leaves out (None in sys.modules: the package looks uninstalled).
    probe = (f"import sys\nfor name in {sorted(BLOCKED_IN_A_SPACE)!r}:\n    sys.modules[name] = None\n"
             "import app\nassert app.demo is not None\nprint(sys.modules['chest_model'].__file__)")
    imported = subprocess.run([sys.executable, "-c", probe], cwd=space, env=env, capture_output=True, text=True, timeout=180)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().splitlines()[-1] == str(space / "chest_model" / "__init__.py")

    port = free_port()
    log = space.parent / "space.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=space, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        client = Client(wait_for_server(proc, port, log), verbose=False)
        result = client.predict(handle_file(str(space / "examples" / "covid.jpeg")), api_name="/predict")
        confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
        assert set(confidences) == CLASSES and abs(sum(confidences.values()) - 1) < 1e-4
        assert result["label"] in CLASSES | {"Uncertain"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_output_below_a_file_is_one_clear_error(saved_model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["space", "--model", str(saved_model), "--output", str(tmp_path / "afile" / "sub")]) == 2
    assert "afile is a file, so no folder can be made below it" in capsys.readouterr().err


def test_a_space_whose_model_cannot_be_loaded_stops_with_one_error_line(saved_model, tmp_path):
    out = tmp_path / "space"
    assert main(["space", "--model", str(saved_model), "--output", str(out)]) == 0
    (out / "model" / "model.safetensors").write_bytes(b"not weights")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "app.py"], cwd=out, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "corrupt safetensors file" in result.stderr


def test_rebuilding_a_cloned_space_keeps_its_git_folder(saved_model, tmp_path):
    out = tmp_path / "space"
    assert main(["space", "--model", str(saved_model), "--output", str(out)]) == 0
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (out / "old-notes.md").write_text("replaced with the rest")
    assert main(["space", "--model", str(saved_model), "--output", str(out)]) == 0
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n" and (out / ".gitattributes").is_file()
    assert not (out / "old-notes.md").exists() and (out / "app.py").is_file()


def test_a_fresh_clone_of_a_new_space_is_built_into_and_a_revision_needs_a_hub_repo(saved_model, tmp_path):
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (clone / "README.md").write_text("---\ntitle: template\n---\n")
    assert main(["space", "--model", str(saved_model), "--output", str(clone)]) == 0
    assert (clone / "app.py").is_file() and (clone / ".git").is_dir()
    with pytest.raises(SpaceError, match="local folder, which has no revisions"):
        build_space(str(saved_model), tmp_path / "other", revision="v1")
