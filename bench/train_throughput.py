"""Training speed: this project's train.py against the tutorial baseline, same images, same run.

    python bench/train_throughput.py [--steps 10] [--sections step,steady,whole] [--repeats 1]

Every figure is printed with the machine it was measured on (CPU, vector ISA, AMX / AVX512-BF16,
cores, device) and each FLOP rate against the measured matmul peak *of the precision it runs in*.
- step:   one VGG19 training step (224 px, batch 4) in each precision and memory format, in-process;
- steady: images/s of the second epoch of train.py against the baseline's, 224 px, real X-rays;
- whole:  start-up to saved model, one epoch on 60 real X-rays, 224 px, batch 4: the baseline,
          `accelerate launch train.py` with no flags (the precision it picks for this machine), and
          `--mixed_precision bf16`.
To measure what an AVX2 machine does on a newer CPU, run it under
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (both kernels libraries then stop at AVX2).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BASELINE, ROOT, baseline_json, bench_device, machine, machine_facts, matmul_peak_tflops,  # noqa: E402
                    require_inputs, run, subset, synchronize, train_flops_per_image)

PY = sys.executable
ACCELERATE = str(Path(PY).parent / "accelerate")


def ours(data: Path, val: Path, out: Path, *, batch: int, precision: str | None, epochs: int, launcher: bool = False,
         train_flags: tuple[str, ...] = ()) -> tuple[float, list[dict], dict]:
    """train.py's wall time, history and record; ``precision=None`` asks for nothing (the machine's choice).

    With the launcher, ``precision`` goes to ``--mixed_precision``; without it, to train.py's own
    ``--mixed-precision`` (an environment value of ``no`` would count as asking for nothing).
    """
    args = [str(ROOT / "train.py"), "--data-dir", str(data), "--val-dir", str(val), "--output-dir", str(out), "--weights", "none",
            "--image-size", "224", "--batch-size", str(batch), "--epochs", str(epochs), "--checkpointing-steps", "none", *train_flags]
    if launcher:
        flags = ["--mixed_precision", precision] if precision else []
        elapsed, _ = run([ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", *flags, *args])
    else:
        elapsed, _ = run([PY, *args, *(["--mixed-precision", precision] if precision else [])])
    return elapsed, json.loads((out / "history.json").read_text()), json.loads((out / "train_config.json").read_text())


def step_rates(flops: float, peaks: dict[str, float], steps: int = 5, *, bf16_emulated: bool = False,
               device: torch.device | None = None, batches: tuple[int, ...] = (4,)) -> list[tuple[str, float, float | None]]:
    """img/s of one training step of the project's model per precision, memory format and batch, and % of that precision's peak.

    Where bf16 is emulated (AVX2) one bf16 step takes minutes: it is timed once, in one memory
    format, and has no meaningful peak to compare with.
    """
    sys.path.insert(0, str(ROOT))
    from chest_model import ChestXrayClassifier

    device = device or bench_device()
    rows = []
    for batch in batches:
        for precision in peaks:
            once = precision == "bf16" and bf16_emulated
            for fmt in (torch.channels_last,) if once else (torch.contiguous_format, torch.channels_last):
                model = ChestXrayClassifier(image_size=224).to(device=device, memory_format=fmt).train()
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
                y = torch.randint(0, 3, (batch,), device=device)
                times = []
                for _ in range(1 if once else steps + 2):
                    synchronize(device)
                    start = time.perf_counter()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                best = min(times[2:] or times)
                rate = batch / best
                label = f"{precision}, {'channels_last' if fmt is torch.channels_last else 'contiguous'}"
                label += f", batch {batch}" if len(batches) > 1 else ""
                if once:
                    rows.append((label + " (emulated, 1 step)", rate, None))
                else:
                    rows.append((label, rate, 100 * rate * flops / (peaks[precision] * 1e12)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="baseline batches timed in steady state")
    parser.add_argument("--sections", default="step,steady,whole")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the whole-process runs (best reported)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    require_inputs()
    facts = machine_facts()
    print(f"machine: {machine()}")
    peaks = {"fp32": matmul_peak_tflops(torch.float32), "bf16": matmul_peak_tflops(torch.bfloat16)}
    flops = train_flops_per_image(224)
    on_gpu = bench_device().type == "cuda"
    print(f"matmul peak ({8192 if on_gpu else 2048}², best of several, {bench_device()}): fp32{' (TF32)' if on_gpu else ''} "
          f"{peaks['fp32'] * 1e3:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] * 1e3:.1f} GFLOP/s; "
          f"VGG19 train step: {flops / 1e9:.1f} GFLOP per 224-px image")
    bf16_fast = facts["auto_precision"] == "bf16"
    bf16_emulated = facts["bf16_emulated"]

    if "step" in sections:
        print(f"\none training step, 224 px, batch 4{' and 64' if on_gpu else ''} (random data, in-process, {bench_device()})")
        print(f"{'precision, memory format':40s} {'images/s':>9s} {'% of its peak':>14s}")
        for label, rate, share in step_rates(flops, peaks, bf16_emulated=bf16_emulated, batches=(4, 64) if on_gpu else (4,)):
            print(f"{label:40s} {rate:9.2f} " + (f"{share:13.1f}%" if share is not None else f"{'-':>14s}"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "steady" in sections:
            steady_train = subset(tmp / "steady" / "train", "train", 16)   # 48 images
            steady_val = subset(tmp / "steady" / "val", "test", 2)         # 6 images
            # The baseline decodes every file every epoch by design, so any batch is steady.
            _, out = run([PY, str(BASELINE), "--data-dir", str(steady_train), "--val-dir", str(steady_val), "--epochs", "1",
                          "--max-steps", str(args.steps), "--threads", "0"])
            base = baseline_json(out)["train_images_per_s"]
            print("\nsteady-state training throughput (second epoch), 224 px, 48 real X-rays")
            print(f"{'run':52s} {'images/s':>9s} {'× baseline':>11s} {'% of its peak':>14s}")
            print(f"{'baseline (tutorial: fp32, batch 4)':52s} {base:9.2f} {1.0:11.2f} {100 * base * flops / (peaks['fp32'] * 1e12):13.1f}%")
            runs = [("ours, batch 4, no precision asked (auto)", 4, None)]
            if bf16_fast:
                runs += [("ours, batch 4, fp32", 4, "no"), ("ours, batch 16, auto", 16, None)]
            else:
                runs += [("ours, batch 16, auto", 16, None)]
            for label, batch, precision in runs:
                _, history, record = ours(steady_train, steady_val, tmp / f"s{batch}{precision}", batch=batch, precision=precision, epochs=2)
                ips = history[-1]["images_per_s"]
                used = "bf16" if record["mixed_precision"] == "bf16" else "fp32"
                print(f"{label + f' [{used}]':52s} {ips:9.2f} {ips / base:11.2f} {100 * ips * flops / (peaks[used] * 1e12):13.1f}%")

        if "whole" in sections:
            small_train = subset(tmp / "small" / "train", "train", 15)     # 45 + 15 = 60 real images
            small_val = subset(tmp / "small" / "val", "test", 5)
            commands = [("accelerate launch train.py (no flags)", None, True, ()), ("python train.py", None, False, ())]
            if bf16_fast:  # auto is bf16 here: show what fp32 would take (the launcher's "no" means "not asked")
                commands.append(("accelerate launch train.py --mixed-precision no", None, True, ("--mixed-precision", "no")))
            elif not bf16_emulated:
                commands.append(("accelerate launch --mixed_precision bf16 train.py", "bf16", True, ()))
            else:  # at the step rate above, one epoch would take a quarter of an hour and show nothing new
                print("(accelerate launch --mixed_precision bf16: not run, bf16 is emulated on this CPU)")
            # Rounds interleave every command, so a slow spell of a shared machine hits them alike;
            # each is reported by its best round (noise only ever adds time), with every round shown.
            times: dict[str, list[float]] = {"baseline": []}
            used: dict[str, str] = {}
            for round_ in range(args.repeats):
                seconds, _ = run([PY, str(BASELINE), "--data-dir", str(small_train), "--val-dir", str(small_val), "--epochs", "1"])
                times["baseline"].append(seconds)
                for label, precision, launcher, flags in commands:
                    seconds, _, record = ours(small_train, small_val, tmp / f"w{len(label)}-{round_}", batch=4, precision=precision, epochs=1,
                                              launcher=launcher, train_flags=flags)
                    times.setdefault(label, []).append(seconds)
                    used[label] = "bf16" if record["mixed_precision"] == "bf16" else "fp32"
            base_s = min(times["baseline"])
            print(f"\nwhole process on 60 real X-rays (45 train + 15 val), 224 px, batch 4, one epoch, start-up to saved model"
                  f"{f', best of {args.repeats} interleaved rounds' if args.repeats > 1 else ''}")
            print(f"{'command':58s} {'seconds':>8s} {'speed-up':>9s}  rounds")
            rounds = lambda label: " ".join(f"{t:.1f}" for t in times[label])  # noqa: E731
            print(f"{'python seed_reference.py (baseline)':58s} {base_s:8.1f} {1.0:8.2f}×  {rounds('baseline')}")
            for label, *_ in commands:
                seconds = min(times[label])
                print(f"{label + f' [{used[label]}]':58s} {seconds:8.1f} {base_s / seconds:8.2f}×  {rounds(label)}")

if __name__ == "__main__":
    main()
