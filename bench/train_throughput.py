"""Training throughput: this project's train.py against the tutorial baseline, same images, same run.

    python bench/train_throughput.py [--steps 10]

Prints images/s for each and their ratio, at the tutorial's settings (224 px, batch 4) and at the
recommended settings (batch 16, bf16), the whole-process time on 60 real images, and the model's
FLOP rate as a fraction of this machine's measured bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASELINE, ROOT, baseline_json, bf16_matmul_peak_tflops, machine, require_inputs, run, subset, train_flops_per_image  # noqa: E402

PY = sys.executable
ACCELERATE = str(Path(PY).parent / "accelerate")


def ours(data: Path, val: Path, out: Path, *, batch: int, precision: str, epochs: int, launcher: bool = False) -> tuple[float, list[dict]]:
    args = [str(ROOT / "train.py"), "--data-dir", str(data), "--val-dir", str(val), "--output-dir", str(out), "--weights", "none",
            "--image-size", "224", "--batch-size", str(batch), "--epochs", str(epochs), "--checkpointing-steps", "none"]
    if launcher:
        cmd = [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
               "--mixed_precision", precision, *args]
        elapsed, _ = run(cmd)
    else:
        elapsed, _ = run([PY, *args], env={"ACCELERATE_MIXED_PRECISION": precision})
    return elapsed, json.loads((out / "history.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="baseline batches timed in steady state")
    args = parser.parse_args()
    require_inputs()
    print(f"machine: {machine()}")
    peak = bf16_matmul_peak_tflops()
    flops = train_flops_per_image(224)
    print(f"bf16 matmul peak: {peak:.2f} TFLOP/s; VGG19 train step: {flops / 1e9:.1f} GFLOP per 224-px image")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steady_train = subset(tmp / "steady" / "train", "train", 16)   # 48 images
        steady_val = subset(tmp / "steady" / "val", "test", 2)         # 6 images
        small_train = subset(tmp / "small" / "train", "train", 15)     # 45 + 15 = 60 real images
        small_val = subset(tmp / "small" / "val", "test", 5)

        # Steady state: baseline decodes every file every epoch by design, so any batch is steady.
        _, out = run([PY, str(BASELINE), "--data-dir", str(steady_train), "--val-dir", str(steady_val), "--epochs", "1",
                      "--max-steps", str(args.steps), "--threads", "0"])
        base = baseline_json(out)["train_images_per_s"]
        rows = [("baseline (tutorial: fp32, batch 4)", base, 1.0)]
        for label, batch, precision in (("ours, tutorial settings (fp32, batch 4)", 4, "no"),
                                        ("ours, tutorial settings + bf16 (batch 4)", 4, "bf16"),
                                        ("ours, recommended (bf16, batch 16)", 16, "bf16")):
            _, history = ours(steady_train, steady_val, tmp / f"o{batch}{precision}", batch=batch, precision=precision, epochs=2)
            ips = history[-1]["images_per_s"]  # second epoch: caches warm, no start-up
            rows.append((label, ips, ips / base))
        print("\nsteady-state training throughput, 224 px, real X-rays")
        print(f"{'run':46s} {'images/s':>9s} {'× baseline':>11s} {'% bf16 peak':>12s}")
        for label, ips, ratio in rows:
            print(f"{label:46s} {ips:9.2f} {ratio:11.2f} {100 * ips * flops / (peak * 1e12):11.1f}%")

        # Whole process: start-up, decode, one epoch of training and validation, on 60 real images.
        base_s, _ = run([PY, str(BASELINE), "--data-dir", str(small_train), "--val-dir", str(small_val), "--epochs", "1"])
        direct_s, _ = ours(small_train, small_val, tmp / "whole1", batch=4, precision="bf16", epochs=1)
        launched_s, _ = ours(small_train, small_val, tmp / "whole2", batch=4, precision="bf16", epochs=1, launcher=True)
        print("\nwhole process on 60 real images (45 train + 15 val), 224 px, batch 4, one epoch, start-up to saved model")
        print(f"baseline (python seed_reference.py):                               {base_s:6.1f} s")
        print(f"ours (ACCELERATE_MIXED_PRECISION=bf16 python train.py):            {direct_s:6.1f} s  speed-up {base_s / direct_s:.2f}×")
        print(f"ours (accelerate launch --mixed_precision bf16 train.py):          {launched_s:6.1f} s  speed-up {base_s / launched_s:.2f}×")


if __name__ == "__main__":
    main()
