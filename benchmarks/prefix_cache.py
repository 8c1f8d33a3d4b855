"""Frozen-prefix caching: a finetune:last=1 epoch on cached frozen-block outputs vs a full fine-tune epoch.

All three fits run in this process on the same split, seed and built-in
EfficientNet-Lite0 (digits at 64 px, augmentation off, the defaults):

* finetune:all (baseline): every block trains on images;
* finetune:last=1 with the prefix cache (the default): the frozen blocks' outputs
  are computed once into an empty cache, then only the top block and head train;
* finetune:last=1 with --cache-budget 0: the same strategy on images, for the
  accuracy and speed the cache must match.

Epoch time is the median of the image phase's epochs (training plus validation),
from each fit's history. Goal: the cached epoch <= 0.35x a full fine-tune epoch,
with the same accuracy.

Run: python benchmarks/prefix_cache.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _common import goal, header, table

from transferkit import ImageClassifier
from transferkit.data import load_data


def fit(splits, strategy: str, epochs: int, budget: float) -> dict:
    start = time.perf_counter()
    clf = ImageClassifier(strategy=strategy, epochs=epochs, cache_budget_gb=budget, progress=False).fit(splits)
    epoch_seconds = [row["seconds"] for row in clf.history_ if row["phase"] != "head"]
    note = clf.phases_[-1].get("prefix_cache", {})
    return {
        "epoch": statistics.median(epoch_seconds),
        "total": time.perf_counter() - start,
        "test": clf.metrics_["test"]["accuracy"],
        "cache": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    header(f"frozen-prefix caching, EfficientNet-Lite0, digits 64 px, {args.epochs} epochs, batch 32")
    os.environ["TRANSFERKIT_CACHE"] = tempfile.mkdtemp(prefix="tk-bench-prefix-")  # misses are paid for here
    splits = load_data("digits", seed=0)
    runs = {
        "finetune:all (baseline)": fit(splits, "finetune:all", args.epochs, 10.0),
        "finetune:last=1, prefix cached": fit(splits, "finetune:last=1", args.epochs, 10.0),
        "finetune:last=1, on images": fit(splits, "finetune:last=1", args.epochs, 0.0),
    }
    base = runs["finetune:all (baseline)"]["epoch"]
    table(
        ["configuration", "epoch s", "ratio", "fit s (incl. probe, extraction)", "test acc"],
        [[name, r["epoch"], r["epoch"] / base, r["total"], r["test"]] for name, r in runs.items()],
    )
    cached, uncached = runs["finetune:last=1, prefix cached"], runs["finetune:last=1, on images"]
    note = cached["cache"]
    print(
        f"prefix cache: blocks up to {note.get('cut')}, {note.get('item_shape')} per image, "
        f"{note.get('bytes', 0) / 1e6:.1f} MB on disk for train + val"
    )
    ratio = cached["epoch"] / base
    goal("finetune:last=1 epoch <= 0.35x a full fine-tune epoch", f"{ratio:.2f}x", ratio <= 0.35)
    gap = abs(cached["test"] - uncached["test"]) * 100
    goal("same accuracy as finetune:last=1 on images (within 1 point)", f"{gap:.2f} points", gap <= 1.0)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
