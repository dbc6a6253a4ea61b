"""End-to-end inference latency per image, from file bytes to probabilities, against the tutorial's path.

    python bench/infer_latency.py [--model demo/starter-model] [--files 12] [--repeat 3] [--device auto]

The tutorial's path is its ``preprocess_image`` + ``model_predict``: cv2.imread of the full-size
file, ToTensor on every pixel, Resize((224, 244)) (its typo), Normalize(0.5, 0.5), a VGG19 with a
Softmax head. Both run on the same median-size (~2 MP) real X-rays, in the same process, one at a time.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASELINE, DATASET, ROOT, machine, machine_facts, require_inputs  # noqa: E402

sys.path.insert(0, str(ROOT))
from chest_model import ChestXrayClassifier, load_image  # noqa: E402
from chest_model.explain import explain_image  # noqa: E402
from chest_model.precision import choose_precision, inference_device  # noqa: E402


def tutorial_path(device: torch.device):
    spec = importlib.util.spec_from_file_location("seed_reference", BASELINE)
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    from torchvision import transforms

    model = seed.build_vgg19_based_model(device).eval()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Resize((224, 244)),
                                    transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])

    def preprocess_image(path):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        return transform(image).unsqueeze(0).to(device)

    @torch.no_grad()
    def model_predict(path):
        return model(preprocess_image(path))[0].tolist()

    return model_predict


def median_files(count: int) -> list[Path]:
    """Real test-split files closest to the dataset's median size (~2 MP)."""
    files = sorted((DATASET / "test").glob("*/*"))
    sized = []
    for path in files:
        h, w = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8).shape[:2]
        sized.append((abs(h * w * 64 - 2.1e6), path, h * w * 64))
    return [p for _, p, _ in sorted(sized)[:count]]


def timed(fn, files, repeat) -> list[float]:
    fn(files[0])  # warm-up
    times = []
    for _ in range(repeat):
        for path in files:
            start = time.perf_counter()
            fn(path)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "demo" / "starter-model"))
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU where one is present), cpu or cuda: both paths run there")
    args = parser.parse_args()
    require_inputs()
    print(f"machine: {machine()}")
    files = median_files(args.files)
    print(f"{len(files)} real test files near 2 MP (sizes {min(cv2.imread(str(f)).size // 3 for f in files) / 1e6:.1f}–"
          f"{max(cv2.imread(str(f)).size // 3 for f in files) / 1e6:.1f} MP), {args.repeat} passes")

    device = inference_device(args.device)
    print(f"device: {device}")
    model = ChestXrayClassifier.from_pretrained(args.model, map_location=device)
    size = model.config.image_size
    # The baseline always runs at 224 px; for a fair race, also time our path on a 224-px model.
    model224 = ChestXrayClassifier(model.config.to_dict() | {"image_size": 224}).eval()
    model224.load_state_dict(model.state_dict())
    model224.to(device)
    facts = machine_facts()
    auto = choose_precision(device).precision  # what precision="auto" runs on this device
    rows = {
        "tutorial preprocess_image + model_predict (fp32, 224x244)": timed(tutorial_path(device), files, args.repeat),
        "ours, predict, 224 px, fp32": timed(lambda p: model224.predict(p.read_bytes()), files, args.repeat),
        f"ours, predict, 224 px, auto ({auto})": timed(lambda p: model224.predict(p.read_bytes(), precision="auto"), files, args.repeat),
        f"ours, predict, starter model ({size} px), fp32": timed(lambda p: model.predict(p.read_bytes()), files, args.repeat),
        f"ours, predict, starter model ({size} px), auto ({auto}; the demo)": timed(lambda p: model.predict(p.read_bytes(), precision="auto"), files, args.repeat),
        f"ours, predict + Grad-CAM, starter model ({size} px)": timed(lambda p: explain_image(model, p.read_bytes()), files, args.repeat),
        "ours, predict + Grad-CAM, 224 px": timed(lambda p: explain_image(model224, p.read_bytes()), files, args.repeat),
    }
    rows["decode only: load_image, full size"] = timed(lambda p: load_image(p.read_bytes()), files, args.repeat)
    rows["decode only: load_image(min_size=224), reduced JPEG decode"] = timed(lambda p: load_image(p.read_bytes(), min_size=224), files, args.repeat)
    base = statistics.median(next(iter(rows.values())))
    print(f"\n{'path':58s} {'median ms':>10s} {'p90 ms':>8s} {'× baseline':>11s}")
    for label, times in rows.items():
        times = sorted(times)
        med = statistics.median(times)
        print(f"{label:58s} {med * 1000:10.1f} {times[int(0.9 * (len(times) - 1))] * 1000:8.1f} {med / base:11.2f}")

    # bf16 must not change answers: same top class and probabilities within 0.02 on the real files.
    if facts["bf16_emulated"] and device.type == "cpu":
        print("\nbf16 vs fp32: not compared, bf16 is emulated on this CPU (auto runs fp32, so the demo's answers are fp32's)")
        return
    worst, flips = 0.0, 0
    for path in files:
        a, b = model.predict(path), model.predict(path, precision="bf16")
        worst = max(worst, max(abs(a[k] - b[k]) for k in a))
        flips += max(a, key=a.get) != max(b, key=b.get)
    print(f"\nbf16 vs fp32 on {len(files)} files: max |Δp| = {worst:.4f}, top-class changes = {flips}")


if __name__ == "__main__":
    main()
