"""`chest-model export`: onnxruntime against PyTorch on real X-rays, the metadata, and the README's snippet run as written."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DATASET, EXAMPLES, ROOT

INSTALL = "pip install '.[export]'"
ort = pytest.importorskip("onnxruntime", reason=f"onnxruntime is not installed ({INSTALL})")
pytest.importorskip("onnxscript", reason=f"onnxscript, which torch's ONNX exporter needs, is not installed ({INSTALL})")

TEMPERATURE = 1.5


def random_model(**config):
    """A small random model whose head is scaled up, so that its probabilities differ from image to image."""
    from chest_model import ChestXrayClassifier

    torch.manual_seed(0)
    model = ChestXrayClassifier(image_size=32, hidden_size=16, temperature=TEMPERATURE, **config).eval()
    for layer in (model.head[2], model.head[5]):
        torch.nn.init.normal_(layer.weight, 0, 8 / layer.in_features ** 0.5)
    return model


def export_with_cli(model, folder: Path) -> Path:
    model.save_pretrained(folder / "model")
    output = folder / "chest-xray.onnx"
    result = subprocess.run([sys.executable, "-m", "chest_model", "export", "--model", str(folder / "model"), "--output", str(output)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert output.is_file() and f"wrote {output}" in result.stdout
    return output


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from chest_model import ChestXrayClassifier

    model = random_model()
    output = export_with_cli(model, tmp_path_factory.mktemp("export"))
    return ChestXrayClassifier.from_pretrained(output.parent / "model"), output


def real_files() -> list[Path]:
    files = sorted(EXAMPLES.glob("*.jpeg"))
    if (DATASET / "test").is_dir():  # a few of the dataset's test files too: PNGs and JPEGs of many sizes
        for class_dir in sorted(p for p in (DATASET / "test").iterdir() if p.is_dir()):
            files += sorted(p for p in class_dir.iterdir() if p.is_file())[:3]
    return files


def real_images(model) -> list[np.ndarray]:
    """Real X-rays, decoded as the package does; without the dataset, the examples mirrored and
    cropped fill a batch of 8 with distinct real pictures."""
    images = [model.preprocessor.load(path) for path in real_files()]
    originals = list(images)
    for image in originals:
        h, w = image.shape[:2]
        images += [np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[h // 8 :, : w - w // 8])]
    return images[: max(8, len(originals))]


def onnx_probabilities(session, pixel_values: np.ndarray, temperature: float) -> np.ndarray:
    logits = session.run(["logits"], {"pixel_values": pixel_values})[0]
    return torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_matches_pytorch_on_real_images(exported, batch):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    temperature = json.loads(session.get_modelmeta().custom_metadata_map["temperature"])
    images = real_images(model)
    expected = model.predict_proba(images, batch_size=batch).numpy()
    pixels = torch.stack([model.preprocessor(image) for image in images]).numpy()
    got = np.concatenate([onnx_probabilities(session, pixels[i : i + batch], temperature) for i in range(0, len(images), batch)])
    assert got.shape == expected.shape == (len(images), 3) and len(images) >= 8
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.ptp(expected, axis=0).max() > 0.01, "the probabilities barely differ between images: the comparison would prove little"


def test_exported_graph_and_metadata(exported):
    from chest_model.export import read_metadata

    model, path = exported
    assert read_metadata(path) == {
        "class_names": ["Normal", "Covid", "Viral Pneumonia"], "image_size": 32, "mean": model.config.mean,
        "std": model.config.std, "temperature": TEMPERATURE, "contrast": "none",
    }
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("pixel_values", "tensor(float)", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # a named, dynamic batch axis


def test_export_without_onnx_says_what_to_install(tiny_model, tmp_path, monkeypatch):
    from chest_model.export import ExportError, export_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ExportError, match=re.escape(INSTALL)):
        export_onnx(tiny_model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def readme_snippet() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "custom_metadata_map" in b]
    assert len(blocks) == 1, "README.md must hold exactly one onnxruntime snippet"
    return blocks[0]


@pytest.mark.parametrize("contrast", ["none", "standardize", "clahe", "equalize"])
def test_readme_onnxruntime_snippet_matches_the_package(tmp_path, monkeypatch, capsys, contrast):
    model = random_model(contrast=contrast)
    export_with_cli(model, tmp_path)  # the snippet opens chest-xray.onnx and examples/covid.jpeg from its folder
    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    printed = eval(capsys.readouterr().out.strip().splitlines()[-1])  # noqa: S307 - the dict the snippet prints
    assert set(printed) == set(model.class_names) and abs(sum(printed.values()) - 1) < 1e-5

    for path in real_files():
        image = model.preprocessor.load(path)
        ours = namespace["preprocess"](image)[0]
        package = model.preprocessor(image).numpy()
        grey_levels = np.abs(ours - package) * 255 * np.array(model.config.std)[:, None, None]
        # Only rounding may differ: at most one grey level, on a minority of the pixels (OpenCV's fixed-point
        # INTER_AREA rounds differently from the snippet's float average at non-integer scale factors).
        assert grey_levels.max() < 1.01 and (grey_levels > 0.01).mean() < 0.10, path
        probabilities = np.array([namespace["classify"](image)[name] for name in model.class_names])
        np.testing.assert_allclose(probabilities, model.predict_proba([image]).numpy()[0], atol=2e-3, err_msg=str(path))


def test_an_output_that_is_a_folder_or_below_a_file_is_refused_before_exporting(tiny_model, tmp_path, monkeypatch):
    from chest_model import ChestModelError
    from chest_model import export

    monkeypatch.setattr(export, "_require_onnx", lambda: pytest.fail("checked before the export starts"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ChestModelError, match="is a folder; give a file name"):
        export.export_onnx(tiny_model, tmp_path)
    with pytest.raises(ChestModelError, match="afile is a file, so no file can be written below it"):
        export.export_onnx(tiny_model, tmp_path / "afile" / "m.onnx")


def test_a_model_cast_to_bf16_exports_an_fp32_graph_and_stays_cast(tmp_path):
    from chest_model.export import export_onnx

    reference = random_model()
    cast = random_model().to(torch.bfloat16)
    path = export_onnx(cast, tmp_path / "m.onnx")
    assert next(cast.parameters()).dtype == torch.bfloat16  # the model itself is left as it was
    inputs = torch.randn(2, 3, 32, 32)
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": inputs.numpy()})
    with torch.no_grad():  # the graph holds the bf16 weights, computed in fp32
        expected = reference.to(torch.bfloat16).float()(inputs).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
