"""The GPU path: training, predict, Grad-CAM, the feature gate and the demo's service on a CUDA GPU.

Each test runs wherever a CUDA GPU is present and skips elsewhere; each compares the GPU's result
with the CPU's, so a device-placement, pinned-memory or dtype mistake fails here.
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from chest_model import ChestXrayClassifier
from chest_model.calibrate import block_summaries, fit_feature_gate
from chest_model.explain import explain_image
from chest_model.precision import choose_precision
from chest_model.training import main
from helpers import ROOT, make_class_folders, synthetic_xray

from test_feature_ood import cached

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def exact_fp32():
    """CPU-vs-GPU comparisons in true fp32: cuDNN runs fp32 convolutions in TF32 by default (a 10-bit
    mantissa), which moves probabilities by ~1e-4 and can flip a decision that sits near a threshold."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def gated_model_pair():
    torch.manual_seed(0)
    cpu = ChestXrayClassifier(image_size=64, hidden_size=16).eval()
    with torch.no_grad():  # a random head gives ~1/3 to every class; spread the logits so a wrong class shows
        cpu.head[-1].weight.mul_(200)
    fit_feature_gate(cpu, cached(40, 0, kind=None, size=64), cached(20, 500, kind=None, size=64), fpr=0.1)
    gpu = ChestXrayClassifier(cpu.config).eval()
    gpu._register_feature_buffers()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to("cuda")


def _images(n):
    """n images like the ones the gate was fitted on (most pass it), then one unlike them (flagged)."""
    alike = [np.stack([synthetic_xray(64, 64, seed=900 + i, kind=i % 3)] * 3, axis=-1) for i in range(n)]
    return alike + [np.stack([synthetic_xray(180, 160, seed=70, kind=0)] * 3, axis=-1)]


def test_training_on_the_gpu_runs_there_and_saves_a_model_that_loads_anywhere(tmp_path, clean_accelerate):
    data = make_class_folders(tmp_path / "data", per_class=6, size=48, seed=3)
    out = tmp_path / "run"
    assert main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
                 "--weights", "none", "--epochs", "2", "--num-workers", "2", "--checkpointing-steps", "epoch"]) == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["device"].startswith("cuda")
    assert record["gpu"] == torch.cuda.get_device_name(0) and set(record["tf32"]) == {"convolutions", "matmul"}
    expected = choose_precision("cuda").precision  # bf16 on tensor-core GPUs
    assert record["mixed_precision"] == {"bf16": "bf16", "fp32": "no"}[expected]
    on_cpu = ChestXrayClassifier.from_pretrained(out)
    on_gpu = ChestXrayClassifier.from_pretrained(out, map_location="cuda")
    assert next(on_gpu.parameters()).device.type == "cuda"
    images = _images(3)
    torch.testing.assert_close(on_gpu.predict_proba(images), on_cpu.predict_proba(images), atol=1e-4, rtol=1e-3)
    # A resume on the GPU reads the checkpoint written there.
    assert main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
                 "--weights", "none", "--epochs", "3", "--num-workers", "2", "--checkpointing-steps", "epoch",
                 "--resume-from-checkpoint", "latest"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2, 3]


def test_predictions_and_feature_scores_on_the_gpu_match_the_cpu(gated_model_pair):
    cpu, gpu = gated_model_pair
    images = _images(5)
    expected, got = cpu.infer(images), gpu.infer(images, batch_size=2)
    labels = [p.label for p in cpu.predict(images)]
    assert labels[-1] == "uncertain" and any(label != "uncertain" for label in labels)  # the check can fail
    torch.testing.assert_close(got.probabilities, expected.probabilities, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.feature_scores, expected.feature_scores, atol=1e-4, rtol=1e-4)
    assert [p.label for p in gpu.predict(images, precision="fp32")] == labels
    # bf16 on the GPU: the same classes and gate decisions to bf16 precision, where they are not ties.
    bf16 = gpu.infer(images, precision="bf16")
    torch.testing.assert_close(bf16.probabilities, expected.probabilities, atol=0.03, rtol=0)
    threshold = cpu.config.feature_threshold
    clear = [i for i, score in enumerate(expected.feature_scores.tolist()) if abs(score / threshold - 1) > 0.05]
    auto = [p.label for p in gpu.predict(images, precision="auto")]
    assert [auto[i] for i in clear] == [labels[i] for i in clear]


def test_the_feature_gate_fits_on_the_gpu_from_summaries_kept_on_the_cpu():
    # Training keeps the validation pass's block summaries on the CPU; the statistics live on the GPU.
    torch.manual_seed(0)
    cpu = ChestXrayClassifier(image_size=64, hidden_size=16).eval()
    gpu = ChestXrayClassifier(cpu.config).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    train, val = cached(40, 0, kind=None, size=64), cached(20, 500, kind=None, size=64)
    kept = [torch.from_numpy(x) for x in block_summaries(cpu, val)]
    expected, got = fit_feature_gate(cpu, train, kept, fpr=0.1), fit_feature_gate(gpu, train, kept, fpr=0.1)
    assert got["threshold"] == pytest.approx(expected["threshold"], rel=1e-3)


def test_gradcam_on_the_gpu_matches_the_cpu(gated_model_pair):
    cpu, gpu = gated_model_pair
    image = _images(1)[0]
    expected, got = explain_image(cpu, image), explain_image(gpu, image)
    assert got.target_class == expected.target_class
    np.testing.assert_allclose(got.heatmap, expected.heatmap, atol=2e-3)


def test_chest_model_predict_runs_on_the_gpu_when_asked(tmp_path, gated_model_pair):
    _, gpu = gated_model_pair
    gpu.save_pretrained(tmp_path / "model")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), synthetic_xray(64, 64, seed=905, kind=2))  # like the gate's X-rays: not flagged
    outputs = {}
    for device in ("cpu", "cuda"):
        result = subprocess.run([sys.executable, "-m", "chest_model", "predict", "--model", str(tmp_path / "model"),
                                 "--device", device, "--json", str(image)], capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "NVIDIA_TF32_OVERRIDE": "0"})  # true fp32 in that process too
        assert result.returncode == 0, result.stderr
        outputs[device] = json.loads(result.stdout)
    assert outputs["cpu"]["uncertain"] is False
    assert outputs["cuda"]["label"] == outputs["cpu"]["label"] and outputs["cuda"]["uncertain"] is False
    for name, p in outputs["cpu"]["probabilities"].items():
        assert abs(outputs["cuda"]["probabilities"][name] - p) < 1e-4


def _confidences(label):
    """A Label value as a dict, whether plain or the "Uncertain" one."""
    return dict(label) if isinstance(label, dict) else {c.label: c.confidence for c in label.confidences}


def test_the_demo_service_predicts_on_the_gpu(tmp_path, gated_model_pair):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    from chest_model.demo import DemoService

    cpu, gpu = gated_model_pair
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), synthetic_xray(64, 64, seed=901, kind=1))
    on_gpu, on_cpu = DemoService(gpu, "m", precision="fp32"), DemoService(cpu, "m", precision="fp32")
    (label_gpu, warning_gpu, _), (label_cpu, warning_cpu, _) = on_gpu.predict_with_warning(str(image)), on_cpu.predict_with_warning(str(image))
    label_gpu, label_cpu = _confidences(label_gpu), _confidences(label_cpu)
    assert set(label_gpu) == set(label_cpu) and bool(warning_gpu) == bool(warning_cpu)
    for name, p in label_cpu.items():
        assert abs(label_gpu[name] - p) < 1e-4


def test_the_demo_service_explains_on_the_gpu(tmp_path, gated_model_pair):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    from chest_model.demo import DemoService

    cpu, gpu = gated_model_pair
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), synthetic_xray(64, 64, seed=902, kind=2))
    picture_gpu, state_gpu = DemoService(gpu, "m", precision="auto").explain(str(image), None, 0.45)[:2]
    picture_cpu, state_cpu = DemoService(cpu, "m", precision="fp32").explain(str(image), None, 0.45)[:2]
    assert np.asarray(picture_gpu).shape == np.asarray(picture_cpu).shape
    assert state_gpu["target"] == state_cpu["target"]
    np.testing.assert_allclose(state_gpu["heatmap"], state_cpu["heatmap"], atol=2e-3)


def test_calibration_and_metrics_take_logits_and_scores_from_the_gpu(gated_model_pair):
    from chest_model.calibrate import fit_feature_threshold, fit_temperature
    from chest_model.engine import metrics_from_logits

    cpu, gpu = gated_model_pair
    logits = torch.randn(30, 3, generator=torch.Generator().manual_seed(0)) * 3
    labels = logits.argmax(1)
    assert fit_temperature(logits.cuda(), labels.cuda()) == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    metrics = metrics_from_logits(logits.cuda().bfloat16(), labels.cuda(), cpu.class_names)
    assert metrics["accuracy"] == 1.0
    summaries = [torch.from_numpy(x).cuda() for x in block_summaries(cpu, cached(20, 500, kind=None, size=64))]
    threshold = gpu.config.feature_threshold
    try:
        assert fit_feature_threshold(gpu, summaries, fpr=0.1)["threshold"] == pytest.approx(threshold, rel=1e-4)
    finally:
        gpu.config.feature_threshold = threshold


def test_onnx_export_of_a_model_on_the_gpu(tmp_path, gated_model_pair):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    import onnxruntime as ort
    from chest_model.export import export_onnx

    cpu, gpu = gated_model_pair
    path = export_onnx(gpu, tmp_path / "m.onnx")
    assert next(gpu.parameters()).device.type == "cuda"  # the model itself stays where it was
    inputs = cpu.preprocessor(_images(1)[0])[None].numpy()
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": inputs})
    with torch.no_grad():
        np.testing.assert_allclose(logits, cpu(torch.from_numpy(inputs)).numpy(), atol=1e-4, rtol=1e-3)
