"""Ranking the three built-in backbones on the digits demo: wall time, the share spent extracting, a cached rerun.

Both runs are `transferkit.compare.run.compare(models=[lite0, lite1, lite2])` in this process on the same split and
seed (feature-extraction only, the 5-fold probe, LogME, costs): the first with an empty feature cache (every
backbone's features computed), the second on the cache the first filled (nothing extracted). Extraction time is
what the feature-extraction runs spent computing or reading pooled features (train, val, test), from each run.

Run: python benchmarks/backbone_ranking.py
"""

from __future__ import annotations

import os
import tempfile
import time

from _common import header, table

from transferkit.compare.run import compare
from transferkit.data import load_data

MODELS = ("builtin:efficientnet_lite0", "builtin:efficientnet_lite1", "builtin:efficientnet_lite2")


def ranked(splits) -> tuple[float, object]:
    start = time.perf_counter()
    c = compare(splits, data_name="digits", models=list(MODELS), settings={"progress": False})
    return time.perf_counter() - start, c


def main() -> None:
    header("Ranking three built-in backbones on digits (compare --models, feature-extraction, 5-fold probe)")
    os.environ["TRANSFERKIT_CACHE"] = tempfile.mkdtemp(prefix="tk-rank-")
    splits = load_data("digits", seed=0)
    rows = []
    for name in ("cold cache", "cached rerun"):
        wall, c = ranked(splits)
        extraction = sum(s.costs.extraction_seconds for s in c.ranking.scores)
        rows.append(
            [
                name,
                f"{wall:.1f} s",
                f"{extraction:.1f} s ({extraction / wall:.0%})",
                ", ".join(s.costs.extraction for s in c.ranking.scores),
            ]
        )
        last = c
    table(["run", "wall time", "extraction (share)", "features"], rows)
    print()
    for s in last.ranking.scores:
        print(
            f"{s.model}: probe {s.cv['accuracy']:.1%} ({s.cv['low']:.1%}-{s.cv['high']:.1%}), LogME {s.logme:.3f}, "
            f"test {s.test_accuracy:.1%}, {s.costs.latency_ms_batch1:.2f} ms/example at batch 1, "
            f"{s.costs.latency_ms_batch32:.2f} at 32, {s.costs.gflops} GFLOPs"
        )
    print(last.ranking.reason)


if __name__ == "__main__":
    main()
