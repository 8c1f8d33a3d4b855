"""Shared helpers for the benchmark scripts: the machine, timing, tables and goal lines.

Every benchmark measures its contenders side by side in one process, on the
same data, model and seed, and prints ratios rather than absolute times alone:
ratios survive a busy machine better than seconds do.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> str:
    """One line naming the machine: CPU, cores, bf16 units, torch version and threads, load average."""
    flags = cpu_flags()
    units = [name for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if flag in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({'+'.join(units) or 'no bf16 units'}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {load:.2f}"
    )


def header(title: str) -> None:
    """Print the benchmark's title and the machine it ran on."""
    print(f"# {title}")
    print(f"machine: {machine()}")
    print()


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call, in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rate(fn: Callable[[], object], items: int, *, repeat: int = 3, warmup: int = 1) -> float:
    """Items per second of `fn` (which processes `items` items), median over `repeat` calls after `warmup`.

    The median, not the best: on a shared machine the best run flatters whichever
    contender happened to get a quiet moment.
    """
    for _ in range(warmup):
        fn()
    return items / statistics.median(seconds(fn) for _ in range(repeat))


def interleaved_rates(contenders: dict[str, Callable[[], object]], items: int, *, rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Items per second for each contender, measured in alternating rounds (median per contender).

    Alternating A, B, C, A, B, C spreads a burst of load from another process over
    every contender instead of charging it to one.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(seconds(fn))
    return {name: items / statistics.median(t) for name, t in times.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table, right-aligned numbers, columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def goal(text: str, measured: str, met: bool) -> bool:
    """Print the one line a goal gets: `goal: ... measured: ... MET/NOT MET`; returns `met`."""
    print(f"goal: {text}  measured: {measured}  {'MET' if met else 'NOT MET'}")
    return met


def tensor_batches(images, transform, batch_size: int) -> list[torch.Tensor]:
    """Every image of `images` through `transform`, stacked into batches: model-only timings need no decoding."""
    xs = torch.stack([transform(images.load(i)) for i in range(len(images))])
    return list(xs.split(batch_size))


def write_jpegs(folder: Path, n: int, size: int = 256, classes: int = 4, seed: int = 0) -> list[Path]:
    """Write `n` photo-like JPEGs (smooth colour fields plus noise, quality 90) in one subfolder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        c = i % classes
        a, b, p = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(a * xx + p), np.cos(b * yy - p), np.sin(a * xx * yy + c)], -1)
        img = ((base * 0.4 + 0.5) * 255 + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"class{c}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths
