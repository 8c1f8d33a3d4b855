"""Peak memory of feature extraction to the on-disk cache is flat in the number of images.

Generates 4N JPEGs once, then extracts features of the first N and of all 4N,
each in a fresh subprocess with an empty cache (`cached_features`, the path
`fit` takes, with its default decoding workers), and reads the subprocess's
peak resident memory (VmHWM; ru_maxrss where /proc is missing). The baseline
is the same subprocess's peak after loading torch, the data and the backbone,
just before extraction. Decoding workers are separate processes; their peak
is reported from RUSAGE_CHILDREN. Extraction runs in the default engine (OpenVINO on a CPU
where it is installed); each subprocess gets its own TRANSFERKIT_CACHE, so both convert the model.

Run: python benchmarks/memory_flat.py [--n 300]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import goal, header, table, write_jpegs

IMAGE_SIZE = 128  # px fed to the model; files are 256x256


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child(folder: Path, n: int, cache: Path) -> None:
    """Extract features of the first `n` images under `folder` into `cache`; print peaks as JSON."""
    import torch

    from transferkit.backbones import load_backbone
    from transferkit.cache.features import FeatureCache, cached_features_info
    from transferkit.data import FileImages
    from transferkit.inference.extraction import resolve_precision

    torch.set_num_threads(os.cpu_count() or 1)
    paths = sorted(folder.rglob("*.jpg"))[:n]
    images = FileImages(paths, [int(p.parent.name[-1]) for p in paths], [f"class{i}" for i in range(4)])
    bb = load_backbone("builtin:efficientnet_lite0", 4)
    bb.configure_input(IMAGE_SIZE)
    cpu = torch.device("cpu")
    before = peak_rss_mb()
    feats, hit, info = cached_features_info(
        bb, images, cache=FeatureCache(cache), device=cpu, dtype=resolve_precision("auto", cpu), progress=False
    )
    assert not hit and feats.shape == (n, bb.num_features)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"before": before, "peak": peak_rss_mb(), "workers": workers, "engine": f"{info.name} {info.precision}"}))


def measure(folder: Path, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tk-bench-f-cache-") as cache:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), str(n), cache],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "TRANSFERKIT_CACHE": cache},
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="the smaller run's image count; the larger is 4x")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "N", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), Path(args.child[2]))
        return
    header(f"peak memory of feature extraction to the cache: {args.n} vs {4 * args.n} images, {IMAGE_SIZE} px")
    with tempfile.TemporaryDirectory(prefix="tk-bench-f-") as tmp:
        write_jpegs(Path(tmp), 4 * args.n)
        runs = {n: measure(Path(tmp), n) for n in (args.n, 4 * args.n)}
    rows = [[f"{n} images ({r['engine']})", r["before"], r["peak"], r["peak"] - r["before"], r["workers"]] for n, r in runs.items()]
    table(["run (fresh process each)", "RSS before MiB", "peak MiB", "extraction adds MiB", "worker peak MiB"], rows)
    small, large = runs[args.n]["peak"], runs[4 * args.n]["peak"]
    ratio = large / small
    goal(f"peak RSS flat: {4 * args.n} vs {args.n} images ratio ~1 (<= 1.1)", f"{ratio:.3f}", ratio <= 1.1)


if __name__ == "__main__":
    main()
