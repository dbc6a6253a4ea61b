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
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "demo" / "starter-model"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=None, help="server-side concurrency limit (default: the demo's)")
    parser.add_argument("--batch", action="store_true", help="serve bench/batch_server.py and use its batched /predict_batch endpoint (max 8 per batch)")
    parser.add_argument("--bad-every", type=int, default=10, help="every Nth request sends a non-image (0: never)")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    api = "/predict_batch" if args.batch else "/predict"
    # The batched endpoint is not part of the demo: bench/batch_server.py serves the demo plus it.
    script = ROOT / "bench" / "batch_server.py" if args.batch else ROOT / "demo" / "app.py"
    if args.concurrency:
        env["CHEST_DEMO_CONCURRENCY"] = str(args.concurrency)
    server = subprocess.Popen([sys.executable, str(script), "--model", args.model, "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        good = sorted((ROOT / "examples").glob("*.jpeg"))
        bad = ROOT / "bench" / ".load-bad.png"
        bad.write_bytes(b"not an image at all")
        process = psutil.Process(server.pid)
        latencies: list[float] = []
        unexpected: list[str] = []
        expected_errors = 0
        lock = threading.Lock()
        stop_at = time.time() + args.seconds

        def worker(index: int) -> None:
            nonlocal expected_errors
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
                    with lock:
                        if ok:
                            latencies.append(time.perf_counter() - start)
                        else:
                            unexpected.append(f"unexpected answer for {path.name}: {result}")
                except Exception as err:  # noqa: BLE001
                    with lock:
                        if send_bad and "not an image" in str(err):
                            expected_errors += 1
                        else:
                            unexpected.append(f"{path.name}: {type(err).__name__}: {err}")

        memory = [process.memory_info().rss]
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        started = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            memory.append(process.memory_info().rss)
        for t in threads:
            t.join()
        elapsed = time.time() - started
        bad.unlink(missing_ok=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    latencies.sort()
    quarter = max(1, len(memory) // 4)
    early, late = statistics.mean(memory[1 : 1 + quarter] or memory), statistics.mean(memory[-quarter:])
    print(f"{args.clients} clients, {elapsed:.0f} s, endpoint {api}, model {Path(args.model).name}")
    print(f"successful predictions: {len(latencies)}; expected errors (bad file): {expected_errors}; unexpected errors: {len(unexpected)}")
    if latencies:
        print(f"latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms; "
              f"throughput {len(latencies) / elapsed:.1f} predictions/s")
    print(f"server RSS: start {memory[0] / 2**20:.0f} MiB, first quarter {early / 2**20:.0f} MiB, last quarter {late / 2**20:.0f} MiB, "
          f"max {max(memory) / 2**20:.0f} MiB")
    for line in unexpected[:10]:
        print("  ", line)
    sys.exit(1 if unexpected else 0)


if __name__ == "__main__":
    main()
