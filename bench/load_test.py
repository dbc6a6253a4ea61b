"""Load test: N concurrent gradio_client clients against the demo on loopback for a fixed time.

    python bench/load_test.py [--model demo/starter-model] [--clients 16] [--seconds 60] [--batch]

Starts the demo itself on a free loopback port, sends real X-rays (and a few bad files) to the
/predict endpoint from N threads, and reports p50/p99 latency, throughput, unexpected errors and the
server's memory (RSS) over time. The request loop is bounded in time and stops by itself.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "demo" / "starter-model"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=None, help="server-side concurrency limit (default: the demo's)")
    parser.add_argument("--batch", action="store_true", help="serve bench/batch_server.py and use its batched /predict_batch endpoint (max 8 per batch)")
    parser.add_argument("--bad-every", type=int, default=10, help="every Nth request sends a non-image (0: never)")
    return parser.parse_args()


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    """The demo (or the batch server) on ``port``, once it accepts connections."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    # The batched endpoint is not part of the demo: bench/batch_server.py serves the demo plus it.
    script = ROOT / "bench" / "batch_server.py" if args.batch else ROOT / "demo" / "app.py"
    if args.concurrency:
        env["CHEST_DEMO_CONCURRENCY"] = str(args.concurrency)
    server = subprocess.Popen([sys.executable, str(script), "--model", args.model, "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    return server


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    expected_errors: int = 0
    memory: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_clients(args: argparse.Namespace, url: str, api: str, bad: Path, process: psutil.Process) -> Tally:
    """``args.clients`` threads sending requests until ``args.seconds`` have passed; the server's RSS every 5 s."""
    from gradio_client import Client, handle_file

    good = sorted((ROOT / "examples").glob("*.jpeg"))
    tally = Tally(memory=[process.memory_info().rss])
    stop_at = time.time() + args.seconds

    def worker(index: int) -> None:
        client = Client(url, verbose=False)
        i = index
        while time.time() < stop_at:
            i += 1
            # A bad file would fail its whole batch, so the batched endpoint gets none.
            send_bad = bool(args.bad_every) and i % args.bad_every == 0 and not args.batch
            path = bad if send_bad else good[i % len(good)]
            start = time.perf_counter()
            try:
                result = client.predict(handle_file(str(path)), api_name=api)
                ok = not send_bad and len(result["confidences"]) == 3
                with tally.lock:
                    if ok:
                        tally.latencies.append(time.perf_counter() - start)
                    else:
                        tally.unexpected.append(f"unexpected answer for {path.name}: {result}")
            except Exception as err:  # noqa: BLE001
                with tally.lock:
                    if send_bad and "not an image" in str(err):
                        tally.expected_errors += 1
                    else:
                        tally.unexpected.append(f"{path.name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
    started = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        tally.memory.append(process.memory_info().rss)
    for t in threads:
        t.join()
    tally.elapsed = time.time() - started
    return tally


def report(args: argparse.Namespace, api: str, tally: Tally) -> None:
    latencies, memory = sorted(tally.latencies), tally.memory
    quarter = max(1, len(memory) // 4)
    early, late = statistics.mean(memory[1 : 1 + quarter] or memory), statistics.mean(memory[-quarter:])
    print(f"{args.clients} clients, {tally.elapsed:.0f} s, endpoint {api}, model {Path(args.model).name}")
    print(f"successful predictions: {len(latencies)}; expected errors (bad file): {tally.expected_errors}; "
          f"unexpected errors: {len(tally.unexpected)}")
    if latencies:
        print(f"latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms; "
              f"throughput {len(latencies) / tally.elapsed:.1f} predictions/s")
    print(f"server RSS: start {memory[0] / 2**20:.0f} MiB, first quarter {early / 2**20:.0f} MiB, last quarter {late / 2**20:.0f} MiB, "
          f"max {max(memory) / 2**20:.0f} MiB")
    for line in tally.unexpected[:10]:
        print("  ", line)


def main() -> None:
    args = parse_args()
    port = free_port()
    api = "/predict_batch" if args.batch else "/predict"
    server = start_server(args, port)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            bad = Path(scratch) / "not-an-image.png"
            bad.write_bytes(b"not an image at all")
            tally = run_clients(args, f"http://127.0.0.1:{port}/", api, bad, psutil.Process(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(args, api, tally)
    sys.exit(1 if tally.unexpected else 0)


if __name__ == "__main__":
    main()
