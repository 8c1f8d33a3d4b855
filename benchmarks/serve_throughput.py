"""transferkit serve under load on loopback: batched vs unbatched, requests/s and latency.

Three servers of the same run (built-in EfficientNet-Lite0, a feature-extraction head on generated
photo-like JPEGs) take the same load in alternating rounds:

* batched (the defaults): requests arriving together share a forward pass of up to 64 images, the
  oldest waiting at most 5 ms for others;
* batched, no wait (--batch-wait 0): only what is already queued joins a batch;
* unbatched (--max-batch 1): one forward pass per request.

A round is R requests of one JPEG each from C concurrent clients (threads of this process with
keep-alive connections; they share the machine's cores with the server, as a co-located client would).
Requests/s and p50/p95 latency are medians over the rounds. Goal: batching at least doubles throughput
at concurrency 8.

Run: python benchmarks/serve_throughput.py [--image-size 224] [--requests 400] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import goal, header, table, write_jpegs

from transferkit import ImageClassifier

CONFIGS = {"batched (64, 5 ms)": [], "batched, no wait": ["--batch-wait", "0"], "unbatched": ["--max-batch", "1"]}
BOUNDARY = "transferkit-bench"


def start(run: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    with open(log, "w") as out:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "transferkit", "serve", str(run), "--port", "0", "-q", *extra], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = re.search(r"at http://[\d.]+:(\d+)", log.read_text())
        if found:
            port = int(found.group(1))
            post(port, body_of(b""), check=False)  # waits until the model has loaded and warmed up
            return proc, port
        time.sleep(0.2)
    raise SystemExit(f"server did not start: {log.read_text()}")


def body_of(data: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'.encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def connection(port: int) -> http.client.HTTPConnection:
    """Keep-alive, Nagle's algorithm off (as curl, browsers and requests have it; http.client's default waits
    for a delayed ACK between the headers and the body of a POST)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def post(port: int, body: bytes, conn: http.client.HTTPConnection | None = None, check: bool = True) -> None:
    own = conn is None
    conn = conn or connection(port)
    conn.request("POST", "/predict", body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    response = conn.getresponse()
    response.read()
    if check and response.status != 200:
        raise SystemExit(f"request failed: {response.status}")
    if own:
        conn.close()


def load(port: int, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    latencies: list[float] = []

    def client(k: int) -> None:
        conn = connection(port)
        for i in range(k, requests, concurrency):
            t = time.perf_counter()
            post(port, bodies[i % len(bodies)], conn)
            latencies.append(time.perf_counter() - t)
        conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"rps": requests / wall, "p50": q[49] * 1000, "p95": q[94] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    header(
        f"transferkit serve, EfficientNet-Lite0 at {args.image_size} px, one 256x256 JPEG per request, "
        f"{args.requests} requests at concurrency {args.concurrency}, {args.rounds} alternating rounds"
    )
    root = Path(tempfile.mkdtemp(prefix="tk-bench-serve-"))
    os.environ["TRANSFERKIT_CACHE"] = str(root / "cache")
    paths = write_jpegs(root / "data", 80)
    clf = ImageClassifier(strategy="feature-extraction", image_size=args.image_size, head_epochs=5).fit(root / "data")
    run = clf.save(root / "run")
    bodies = [body_of(p.read_bytes()) for p in paths]
    servers = {name: start(run, extra, root / f"{i}.log") for i, (name, extra) in enumerate(CONFIGS.items())}
    try:
        for _, port in servers.values():  # warm every server up with the same load once
            load(port, bodies, args.requests // 4, args.concurrency)
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                rounds[name].append(load(port, bodies, args.requests, args.concurrency))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    result = {name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p95")} for name, rs in rounds.items()}
    base = result["unbatched"]["rps"]
    table(
        ["server", "req/s", "x unbatched", "p50 ms", "p95 ms"],
        [[name, r["rps"], r["rps"] / base, r["p50"], r["p95"]] for name, r in result.items()],
    )
    ratio = result["batched (64, 5 ms)"]["rps"] / base
    goal(f"batched >= 2x unbatched requests/s at concurrency {args.concurrency}", f"{ratio:.2f}x", ratio >= 2)


if __name__ == "__main__":
    main()
