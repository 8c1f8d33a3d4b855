"""Transfer learning vs fine-tuning, measured on the user's data.

`compare` runs each strategy on the same split and seed, sharing the feature
cache (the probe's features are computed once for all strategies), and
records what the seed's "key differences" table only describes: trainable
parameters, training time, peak memory, accuracy. Optionally a learning curve
over training-set fractions (where does fine-tuning overtake feature
extraction?) and a from-scratch baseline (what is pretraining worth here?).
"""

from __future__ import annotations

import gc
import os
import platform
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import psutil
import torch

from transferkit.classifier import CLASSIFIERS
from transferkit.data.examples import DataSplits
from transferkit.data.splits import subsample_per_class
from transferkit.errors import UsageError
from transferkit.report import Comparison, StrategyResult
from transferkit.runs import library_versions
from transferkit.strategies import parse_strategy
from transferkit.tracking import Tracker, log_strategy_result

DEFAULT_STRATEGIES = ("feature-extraction", "finetune:last=2", "finetune:all", "lp-ft")


class PeakMemory:
    """Peak resident memory (MiB) above the level at start, sampled every 20 ms (psutil); CUDA peak on GPU.

    On CPU this is the growth of the process's RSS while a strategy runs: what it
    allocated beyond what was already resident (the loaded libraries, the data).
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.peak = 0
        self._process = psutil.Process()

    def rss(self) -> int:
        return self._process.memory_info().rss

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.start, self.peak, self._stop = self.rss(), 0, threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss() - self.start)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)

    @property
    def mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return self.peak / 2**20


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_strategy(splits: DataSplits, spec: str, *, model: str | None, settings: dict, label: str | None = None,
                 weights: str | None = None, tracker: Tracker | None = None) -> tuple[StrategyResult, object]:
    """Fit one strategy and measure it; with `tracker`, logged as a run nested in it, named by the label."""
    with (tracker.child(label or spec) if tracker is not None else nullcontext()) as run:
        result, clf = _measure(splits, spec, model=model, settings=settings, label=label, weights=weights, tracker=run)
        if run is not None:
            log_strategy_result(run, result.row())
    return result, clf


def _measure(splits: DataSplits, spec: str, *, model: str | None, settings: dict, label: str | None, weights: str | None,
             tracker: Tracker | None) -> tuple[StrategyResult, object]:
    """Fit the classifier of the data's modality, timing it and sampling its memory."""
    clf = CLASSIFIERS[splits.train.modality](model, strategy=spec, weights=weights, tracker=tracker, **settings)
    with PeakMemory(settings.get("device", "auto")) as mem:
        start = time.perf_counter()
        clf.fit(splits)
        seconds = time.perf_counter() - start
    trainable = trainable_params(clf)
    test = clf.metrics_["test"]
    per_class = len(splits.train) / len(splits.classes)
    epochs = sum(p["epochs_run"] for p in clf.phases_ if not p["on_features"] or p.get("solver") != "lbfgs")
    training = sum(p["seconds"] for p in clf.phases_)
    run = {"seed": clf.config_.seed, "val_accuracy": clf.metrics_["val_accuracy"], "test_accuracy": test["accuracy"],
           "macro_f1": test["macro_f1"], "balanced_accuracy": test.get("balanced_accuracy"), "ece": test.get("ece"),
           "seconds": training, "wall_seconds": seconds, "calibration": clf.metrics_.get("calibration"),
           "predictions": test.get("predictions")}
    result = StrategyResult(spec, label or spec, trainable, clf.backbone_.param_counts()["total"], epochs, training,
                            mem.mib, clf.metrics_["val_accuracy"], test["accuracy"], test["macro_f1"], per_class,
                            metrics=test, phases=clf.phases_, history=clf.history_, wall_seconds=seconds, runs=[run])
    return result, clf


def run_seeds(splits: DataSplits, spec: str, seeds: int, *, model: str | None, settings: dict,
              tracker: Tracker | None = None) -> tuple[StrategyResult, object]:
    """One strategy trained with `seeds` training seeds on the same split: scores are means, runs keeps each seed.

    The split stays the one given; only the training seed (initialisation of the head, batch order,
    augmentation) changes: seed, seed + 1, ... Cached features are reused, so extra seeds cost the training.
    """
    base = settings.get("seed") or 0
    first, clf = run_strategy(splits, spec, model=model, settings=settings, tracker=tracker,
                              label=None if seeds == 1 else f"{spec} seed {base}")
    first.label = spec
    for i in range(1, seeds):
        more, _ = run_strategy(splits, spec, model=model, settings={**settings, "seed": base + i}, tracker=tracker,
                               label=f"{spec} seed {base + i}")
        first.runs += more.runs
        first.peak_memory_mib = max(first.peak_memory_mib, more.peak_memory_mib)
    for key in ("val_accuracy", "test_accuracy", "macro_f1", "seconds", "wall_seconds"):
        setattr(first, key, sum(run[key] for run in first.runs) / len(first.runs))
    return first, clf


def cv_probe(clf, splits: DataSplits, k: int | None, seed: int) -> dict | None:
    """The frozen-feature probe's k-fold accuracy on train + val (cached features), with its Wilson interval.

    k None: 5 folds when train + val x feature size is at most evidence.MAX_CV_CELLS values, else off.
    `clf` is a fitted feature-extraction classifier: its backbone is the pretrained one.
    """
    from transferkit.evidence import cross_validated_probe, default_cv_folds
    from transferkit.features import FeatureCache, cached_features
    from transferkit.inference import resolve_device, resolve_precision

    device = resolve_device(clf.config_.device)
    dtype = resolve_precision(clf.config_.precision, device)
    parts = [cached_features(clf.backbone_, split, cache=FeatureCache.default(enabled=clf.cache), device=device,
                             dtype=dtype, workers=clf.config_.workers, progress=False, engine=clf.config_.engine)[0]
             for split in (splits.train, splits.val)]
    x, y = np.concatenate(parts).astype(np.float32), np.concatenate([splits.train.labels, splits.val.labels])
    k = default_cv_folds(len(y), x.shape[1]) if k is None else k
    if not k:
        return None
    return cross_validated_probe(x, y, k=k, seed=seed).to_dict() | {"n_train": len(splits.train), "n_val": len(splits.val)}


def trainable_params(clf) -> int:
    """Parameters the strategy's last phase trained (head plus its unfrozen blocks)."""
    counts = clf.backbone_.param_counts()
    blocks = clf.phases_[-1].get("trainable_blocks", [])
    return counts["head"] + sum(counts[b] for b in blocks)


def check_repeats(seeds: int, cv: int | None) -> None:
    """Refuse a bad seed count or fold count before any work."""
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise UsageError(f"--seeds (seeds) must be a whole number of at least 1; got {seeds!r}.")
    if cv is not None and (not isinstance(cv, int) or isinstance(cv, bool) or cv == 1 or cv < 0):
        raise UsageError(f"--cv (cv) must be 0 (off) or at least 2 folds; got {cv!r}.")


def compare(splits: DataSplits, *, data_name: str, model: str | None = None, strategies: Sequence[str] = DEFAULT_STRATEGIES,
            fractions: Sequence[float] = (), baseline: str | None = None, settings: dict | None = None,
            on_result=None, tracker: Tracker | None = None, seeds: int = 1, cv: int | None = None) -> Comparison:
    """Run every strategy on the same split and seed; optionally a learning curve and a scratch baseline.

    Args:
        splits: the data, split once for every strategy.
        strategies: strategy specs (no 'auto': compare measures what auto would choose from).
        fractions: training-set fractions per class for a learning curve (1.0 = the full run above).
        baseline: "scratch" adds the same architecture trained from random initialisation (finetune:all).
        settings: classifier settings shared by every run (epochs, image_size or max_length, seed, ...).
        on_result: called with each StrategyResult as it finishes (for live output).
        tracker: an open experiment-tracking run; each strategy (and curve point, baseline) is logged as a run nested in it.
        seeds: training seeds per strategy (seed, seed + 1, ...) on the same split; the table shows mean +- sd.
        cv: folds of the cross-validated probe on train + val; None for the default rule (`cv_probe`), 0 for none.
    """
    check_repeats(seeds, cv)
    settings = dict(settings or {})
    specs = [parse_strategy(s).spec for s in strategies]
    if "auto" in specs:
        raise UsageError("compare measures concrete strategies; leave 'auto' out (fit --strategy auto uses them).")
    if len(set(specs)) != len(specs):
        raise UsageError(f"--strategies lists a strategy twice: {', '.join(strategies)}.")
    if baseline not in (None, "scratch"):
        raise UsageError(f"--baseline must be 'scratch'; got '{baseline}'.")
    notify = on_result or (lambda r: None)
    results, probe_clf = [], None
    for spec in specs:
        result, clf = run_seeds(splits, spec, seeds, model=model, settings=settings, tracker=tracker)
        probe_clf = clf if spec == "feature-extraction" else probe_clf
        results.append(result)
        notify(result)
    if cv != 0 and probe_clf is None:  # the probe's features come from the cache whichever strategy computed them
        probe_clf = CLASSIFIERS[splits.train.modality](model, strategy="feature-extraction", **settings).fit(splits)
    cv_result = cv_probe(probe_clf, splits, cv, settings.get("seed") or 0) if cv != 0 else None
    curve = []
    for fraction in sorted(f for f in fractions if f < 1):
        sub = DataSplits(subsample_per_class(splits.train, fraction, settings.get("seed") or 0), splits.val, splits.test,
                         splits.summary)
        for spec in specs:
            result, _ = run_strategy(sub, spec, model=model, settings=settings, label=f"{spec} @ {fraction:g}",
                                     tracker=tracker)
            curve.append(result)
            notify(result)
    if curve:
        curve.extend(results)
    base = None
    if baseline == "scratch":
        base, _ = run_strategy(splits, "finetune:all", model=model, settings=settings, weights="none",
                               label="scratch (random init, finetune:all)", tracker=tracker)
        notify(base)
    configs = {r.strategy: r.phases for r in results}
    return Comparison(data_name, model or "default", settings.get("seed") or 0, results, curve, base, configs,
                      machine_info(), splits.sizes(), library_versions(), seeds=seeds, cv=cv_result,
                      noun=f"{splits.train.noun}s", train_class_counts=list(splits.train.class_counts().values()))
