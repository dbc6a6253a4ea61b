"""Packaging: an inference-only install really runs without the training stack; one version; licence and typing files."""
import subprocess
import sys
import tomllib
from importlib import metadata

import chest_model
from helpers import EXAMPLES, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TRAINING_ONLY = ["sklearn", "matplotlib", "accelerate", "gradio", "onnx", "onnxruntime", "pytest", "skimage"]

# Each blocked package looks uninstalled: with None in sys.modules, `import x` raises ImportError and
# importlib.util.find_spec("x") returns None, as for a package that is not there.
INFERENCE = f"""
import sys
for name in {TRAINING_ONLY!r}:
    sys.modules[name] = None

import tempfile
from pathlib import Path

import torch
from chest_model import ChestXrayClassifier, ChestXrayConfig, explain_image
from chest_model.feature_ood import block_dims

torch.manual_seed(0)
model = ChestXrayClassifier(ChestXrayConfig(image_size=32, hidden_size=8))
dims = block_dims(model.features)  # a fitted feature-space gate, so prediction runs its scoring too
model.set_feature_statistics([torch.zeros(d) for d in dims], [torch.eye(d) for d in dims], torch.ones(len(dims)),
                             threshold=1e9, fpr=0.02)
folder = Path(tempfile.mkdtemp()) / "m"
model.save_pretrained(folder)                       # weights, config and the rendered model card
loaded = ChestXrayClassifier.from_pretrained(folder)
result = loaded.predict({str(EXAMPLES / "covid.jpeg")!r})
assert abs(sum(result.values()) - 1) < 1e-4, result
assert explain_image(loaded, {str(EXAMPLES / "normal.jpeg")!r}).heatmap.shape
assert not any(sys.modules.get(name) for name in {TRAINING_ONLY!r})
print("OK", result.label)
"""


def test_inference_runs_without_training_plotting_demo_or_test_packages():
    run = subprocess.run([sys.executable, "-c", INFERENCE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("OK")


def _names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_base_dependencies_are_inference_only_and_the_extras_add_the_rest():
    project = PYPROJECT["project"]
    base, extras = _names(project["dependencies"]), project["optional-dependencies"]
    assert not base & {"accelerate", "scikit-learn", "matplotlib", "gradio", "onnx", "onnxruntime", "pytest"}
    assert {"accelerate", "scikit-learn", "matplotlib"} <= _names(extras["train"])
    assert "gradio" in _names(extras["demo"]) and {"onnx", "onnxruntime"} <= _names(extras["export"])
    assert "chest-xray-classifier[train,demo,export]" in extras["dev"] and "pytest" in _names(extras["dev"])


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "chest_model.__version__"}
    assert metadata.version("chest-xray-classifier") == chest_model.__version__


def test_licence_typing_marker_and_urls_ship():
    assert "MIT License" in (ROOT / "LICENSE").read_text() and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "chest_model" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["chest_model"]
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    assert "setuptools>=77" in requires  # the first setuptools that takes an SPDX `license` and `license-files`
    assert set(PYPROJECT["project"]["urls"]) >= {"Homepage", "Repository"}


def test_the_package_has_no_import_cycles():
    """Every relative import counts, lazy ones inside functions too; only ``if TYPE_CHECKING:`` blocks are skipped."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "chest_model"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                       for n in ast.walk(node)}
        graph[path.stem] = {(node.module or alias.name).split(".")[0]
                            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                            and id(node) not in typing_only for alias in node.names}

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := cycle_from(start, [*path, nxt])):
                return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert not cycles, f"import cycles: {cycles}"
