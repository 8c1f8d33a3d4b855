"""The default engine vs `--engine torch` for a whole cold-cache feature-extraction fit (issue 17's acceptance).

Writes the built-in 1,797 digits (scikit-learn's, as the demo loads them) as 224 px JPEGs
(8x8 -> bicubic 224 px, quality 90, one folder per class), then runs the real CLI,
`transferkit fit DIR --strategy feature-extraction`, in a subprocess per run: `--engine torch`
and the default engine (`auto`: OpenVINO on a CPU where the extra is installed) in alternating
pairs, each with a fresh, empty TRANSFERKIT_CACHE, so every run pays its own feature extraction
and the OpenVINO run its one-time conversion. Wall time per run (process start to exit, imports
included), the ratio per pair, and the test accuracy of both from each run's transferkit.json.

Run: python benchmarks/fit_engines.py [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import goal, header, table

SIZE = 224
GOAL = 2.0  # the default engine at least 2x faster end to end
ACCURACY_POINTS = 0.5  # and the same test accuracy within half a point


def write_digits(root: Path) -> int:
    """The built-in digits (the demo's images) as SIZE px RGB JPEGs under root/<class>/; returns how many."""
    from PIL import Image

    from transferkit.data import load_digits_images

    digits = load_digits_images()
    for i, label in enumerate(digits.labels):
        path = root / digits.classes[label] / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        digits.load(i).resize((SIZE, SIZE), Image.BICUBIC).save(path, quality=90)
    return len(digits)


def fit_once(data: Path, out: Path, engine: str | None) -> tuple[float, float, str]:
    """Seconds, test accuracy and the recorded engine of one cold-cache CLI fit (engine None: the default)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_ENGINE"} | {"TRANSFERKIT_CACHE": cache}
        command = [
            sys.executable,
            "-m",
            "transferkit",
            "fit",
            str(data),
            "--strategy",
            "feature-extraction",
            "--out",
            str(out),
            "--overwrite",  # each pair replaces the run of the one before
            "-q",
            *(["--engine", engine] if engine else []),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"fit failed ({' '.join(command)}):\n{done.stdout}{done.stderr}")
    record = json.loads((out / "transferkit.json").read_text())
    return elapsed, record["metrics"]["test"]["accuracy"], record["feature_cache"].get("engine", "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="alternating torch/default pairs (default 2)")
    args = parser.parse_args()
    header("a cold-cache feature-extraction fit: the default engine vs --engine torch")
    work = Path(tempfile.mkdtemp(prefix="transferkit-fit-engines-"))
    try:
        n = write_digits(work / "digits")
        rows, ratios, gaps = [], [], []
        for pair in range(1, args.pairs + 1):
            torch_s, torch_acc, _ = fit_once(work / "digits", work / "run-torch", "torch")
            auto_s, auto_acc, engine = fit_once(work / "digits", work / "run-default", None)
            ratios.append(torch_s / auto_s)
            gaps.append(abs(torch_acc - auto_acc) * 100)
            rows.append([pair, f"{torch_s:.1f}", f"{auto_s:.1f} ({engine})", f"{ratios[-1]:.2f}x", f"{torch_acc:.2%}", f"{auto_acc:.2%}"])
            print(f"pair {pair}: torch {torch_s:.1f} s, default {auto_s:.1f} s", flush=True)
        print(f"\n{n} digits as {SIZE} px JPEGs, cold cache each run")
        table(["pair", "torch s", "default s (engine)", "ratio", "torch test acc", "default test acc"], rows)
        goal(
            f"the default engine >= {GOAL:g}x faster end to end",
            f"{min(ratios):.2f}x (worst pair; median {statistics.median(ratios):.2f}x)",
            min(ratios) >= GOAL,
        )
        goal(f"same test accuracy within {ACCURACY_POINTS} point", f"{max(gaps):.2f} points", max(gaps) <= ACCURACY_POINTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
