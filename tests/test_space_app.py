"""space_app.py: the Space's app template, and the settings `chest-model space` fills into it
(the built Space is run as a real server in test_space.py)."""
import ast

import pytest

from chest_model.space import PACKAGE_DIR, _app_source

SETTINGS = ("MODEL", "REVISION", "MODEL_NAME")


def _top_level_constants(source: str) -> dict[str, object]:
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in SETTINGS:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def test_the_template_serves_a_folder_named_model_by_default():
    template = (PACKAGE_DIR / "space_app.py").read_text(encoding="utf-8")
    assert _top_level_constants(template) == {"MODEL": "model", "REVISION": None, "MODEL_NAME": "model"}
    assert "Research demo, not for clinical use" in template


@pytest.mark.parametrize("model, revision, name", [
    ("model", None, "runs/vgg19"),
    ("you/chest-xray", "v1.0", "you/chest-xray"),
    ("it's/odd", "refs/pr/1", 'a "quoted" name'),  # quotes in a value stay a valid Python literal
])
def test_the_builder_fills_each_setting_once_as_a_python_literal(model, revision, name):
    source = _app_source(model, revision, name)
    assert _top_level_constants(source) == {"MODEL": model, "REVISION": revision, "MODEL_NAME": name}
    compile(source, "app.py", "exec")
