"""The data doctor against known label errors: digits with 2%, 5% and 10% of its training labels flipped.

Each rate flips a seeded random share of the training split's labels to
another class (uniformly), runs `transferkit.doctor.diagnose` on the flipped split
(the built-in EfficientNet-Lite0; features from the cache after the first
run) and measures the flagged examples (kind "label", train + val) against
the flips: precision (flagged that were flipped), recall (flips flagged) and
AUROC of the score 1 - p(given label) over every train + val example (the
validation split stays clean, so its examples count as negatives). Then the
wall time of one whole `diagnose("digits")` with the features cached, as
`transferkit doctor digits` runs it. Goal at 5%: precision >= 0.7, recall >= 0.6.

Run: python benchmarks/doctor_label_flips.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import goal, header, table
from sklearn.metrics import roc_auc_score

from transferkit.data import DataSplits, load_data
from transferkit.doctor.diagnose import diagnose

RATES = (0.02, 0.05, 0.10)


def with_flips(splits: DataSplits, rate: float, seed: int) -> tuple[DataSplits, np.ndarray]:
    """The splits with round(rate * n_train) training labels moved to another class; and which were moved."""
    rng = np.random.default_rng(seed)
    train = splits.train.subset(range(len(splits.train)))
    flipped = rng.choice(len(train), round(rate * len(train)), replace=False)
    k = len(splits.classes)
    train.labels = train.labels.copy()
    train.labels[flipped] = (train.labels[flipped] + rng.integers(1, k, len(flipped))) % k
    return DataSplits(train, splits.val, splits.test, splits.summary), flipped


def measure(splits: DataSplits, rate: float, seed: int) -> dict:
    noisy, flipped = with_flips(splits, rate, seed)
    d = diagnose(noisy, seed=seed)
    flagged = {f.index for f in d.of_kind("label") if f.split == "train"}
    flagged_val = sum(f.split == "val" for f in d.of_kind("label"))
    truth = set(flipped.tolist())
    hits = len(flagged & truth)
    n_flagged = len(flagged) + flagged_val
    is_flip = np.zeros(len(noisy.train) + len(noisy.val), dtype=bool)
    is_flip[flipped] = True
    scores = np.concatenate([d.label_scores["train"], d.label_scores["val"]])  # 1 - p(given), out of sample
    return {
        "precision": hits / max(n_flagged, 1),
        "recall": hits / len(truth),
        "auroc": roc_auc_score(is_flip, scores),
        "flagged": n_flagged,
        "flips": len(truth),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="flip draws per rate (seed 0, 1, ...)")
    args = parser.parse_args()
    header("data doctor: label flips on digits")
    splits = load_data("digits")
    diagnose(splits)  # fills the feature cache (a no-op when a fit or an earlier run has)
    rows, at5 = [], None
    for rate in RATES:
        runs = [measure(splits, rate, seed) for seed in range(args.seeds)]
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        rows.append(
            [
                f"{rate:.0%}",
                f"{mean['flips']:.0f}",
                f"{mean['flagged']:.0f}",
                f"{mean['precision']:.2f}",
                f"{mean['recall']:.2f}",
                f"{mean['auroc']:.3f}",
            ]
        )
        at5 = mean if rate == 0.05 else at5
    table(["flipped", "flips", "flagged", "precision", "recall", "AUROC"], rows)
    print(f"(means over {args.seeds} seeded flip draws; train {len(splits.train)}, val {len(splits.val)} examples)")
    start = time.perf_counter()
    d = diagnose("digits")
    print(f"doctor on cached digits: {time.perf_counter() - start:.1f} s ({d.summary_line()})")
    goal("precision at 5% >= 0.7", f"{at5['precision']:.2f}", at5["precision"] >= 0.7)
    goal("recall at 5% >= 0.6", f"{at5['recall']:.2f}", at5["recall"] >= 0.6)


if __name__ == "__main__":
    main()
