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
import hashlib
import itertools
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from transferkit.classifier import CLASSIFIERS, Classifier
from transferkit.compare.options import check_models, check_repeats, check_several_models
from transferkit.compare.ranking import Ranking
from transferkit.compare.results import Comparison, StrategyResult
from transferkit.data.examples import DataSplits
from transferkit.data.splits import subsample_per_class
from transferkit.errors import UsageError
from transferkit.runs.directory import library_versions
from transferkit.stats.wording import format_interval
from transferkit.tracking import Tracker, log_strategy_result
from transferkit.training.strategies import parse_strategy

log = logging.getLogger(__name__)

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


def run_strategy(
    splits: DataSplits,
    spec: str,
    *,
    model: str | None,
    settings: dict,
    label: str | None = None,
    weights: str | None = None,
    tracker: Tracker | None = None,
) -> tuple[StrategyResult, Classifier]:
    """Fit one strategy and measure it; with `tracker`, logged as a run nested in it, named by the label."""
    with tracker.child(label or spec) if tracker is not None else nullcontext() as run:
        result, clf = _measure(splits, spec, model=model, settings=settings, label=label, weights=weights, tracker=run)
        if run is not None:
            log_strategy_result(run, result.row())
    return result, clf


def _measure(
    splits: DataSplits, spec: str, *, model: str | None, settings: dict, label: str | None, weights: str | None, tracker: Tracker | None
) -> tuple[StrategyResult, Classifier]:
    """Fit the classifier of the data's modality, timing it and sampling its memory."""
    clf = CLASSIFIERS[splits.train.modality](model, strategy=spec, weights=weights, tracker=tracker, **settings)
    with PeakMemory(settings.get("device", "auto")) as mem:
        start = time.perf_counter()
        clf.fit(splits)
        seconds = time.perf_counter() - start
    trainable = trainable_params(clf)
    test = clf.metrics_["test"]
    per_class = len(splits.train) / len(splits.classes)
    epochs = sum(p.trained_epochs for p in clf.phases_)
    training = sum(p.seconds for p in clf.phases_)
    run = {
        "seed": clf.config_.seed,
        "val_accuracy": clf.metrics_["val_accuracy"],
        "test_accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "balanced_accuracy": test.get("balanced_accuracy"),
        "ece": test.get("ece"),
        "seconds": training,
        "wall_seconds": seconds,
        "calibration": clf.metrics_.get("calibration"),
        "predictions": test.get("predictions"),
    }
    result = StrategyResult(
        strategy=spec,
        label=label or spec,
        trainable_params=trainable,
        total_params=clf.backbone_.param_counts()["total"],
        epochs=epochs,
        seconds=training,
        peak_memory_mib=mem.mib,
        val_accuracy=clf.metrics_["val_accuracy"],
        test_accuracy=test["accuracy"],
        macro_f1=test["macro_f1"],
        train_per_class=per_class,
        metrics=test,
        phases=clf.phases_,
        history=clf.history_,
        wall_seconds=seconds,
        runs=[run],
    )
    return result, clf


def run_seeds(
    splits: DataSplits,
    spec: str,
    seeds: int,
    *,
    model: str | None,
    settings: dict,
    tracker: Tracker | None = None,
    label: str | None = None,
    started: StrategyResult | None = None,
    on_seed: Callable[[StrategyResult], None] | None = None,
) -> tuple[StrategyResult, Classifier | None]:
    """One strategy trained with `seeds` training seeds on the same split: scores are means, runs keeps each seed.

    The split stays the one given; only the training seed (initialisation of the head, batch order,
    augmentation) changes: seed, seed + 1, ... Cached features are reused, so extra seeds cost the training.
    `label` names the result (default: the spec). `started`: the seeds an interrupted comparison finished (from
    compare.json), not trained again; `on_seed` is called with the result so far after each seed. The classifier
    returned is the last seed trained (None when every seed was in `started`).
    """
    base, label = settings.get("seed") or 0, label or spec
    result, clf = started, None
    done = {run["seed"] for run in started.runs} if started else set()
    for seed in (base + i for i in range(seeds)):
        if seed in done:
            continue
        name = label if seeds == 1 else f"{label} seed {seed}"
        more, clf = run_strategy(splits, spec, model=model, settings={**settings, "seed": seed}, tracker=tracker, label=name)
        if result is None:
            result = more
            result.label = label
        else:
            result.runs += more.runs
            result.peak_memory_mib = max(result.peak_memory_mib, more.peak_memory_mib)
        for key in ("val_accuracy", "test_accuracy", "macro_f1", "seconds", "wall_seconds"):
            setattr(result, key, sum(run[key] for run in result.runs) / len(result.runs))
        if on_seed is not None:
            on_seed(result)
    assert result is not None, "seeds >= 1"
    return result, clf


def train_val_features(clf, splits: DataSplits) -> tuple[np.ndarray, np.ndarray]:
    """The pretrained backbone's pooled features (from the cache) and labels of train + val, in that order.

    `clf` is a fitted feature-extraction classifier: below its head, its backbone is the pretrained one.
    """
    from transferkit.cache.features import FeatureCache, cached_features
    from transferkit.inference.extraction import resolve_device, resolve_precision

    device = resolve_device(clf.config_.device)
    dtype = resolve_precision(clf.config_.precision, device)
    parts = [
        cached_features(
            clf.backbone_,
            split,
            cache=FeatureCache.default(enabled=clf.cache),
            device=device,
            dtype=dtype,
            workers=clf.config_.workers,
            progress=False,
            engine=clf.config_.engine,
        )[0]
        for split in (splits.train, splits.val)
    ]
    return np.concatenate(parts).astype(np.float32), np.concatenate([splits.train.labels, splits.val.labels])


def cv_probe(clf, splits: DataSplits, k: int | None, seed: int) -> dict | None:
    """The frozen-feature probe's k-fold accuracy on train + val (cached features), with its Wilson interval.

    k None: 5 folds when train + val x feature size is at most crossval.MAX_CV_CELLS values, else off.
    `clf` is a fitted feature-extraction classifier: its backbone is the pretrained one.
    """
    from transferkit.stats.crossval import cross_validated_probe, default_cv_folds

    x, y = train_val_features(clf, splits)
    k = default_cv_folds(len(y), x.shape[1]) if k is None else k
    if not k:
        return None
    return cross_validated_probe(x, y, k=k, seed=seed).to_dict() | {"n_train": len(splits.train), "n_val": len(splits.val)}


def rank_backbones(probes: dict[str, tuple[StrategyResult, Classifier]], splits: DataSplits, k: int | None, seed: int) -> Ranking:
    """Each backbone's cross-validated probe, LogME and costs from its feature-extraction run; ranked (ranking.rank).

    Latencies are timed last, for every backbone in interleaved rounds (`ranking.time_backbones`).
    """
    from transferkit.compare.ranking import RANKING_FOLDS, rank, score_backbone, time_backbones, with_latency

    examples = splits.test if len(splits.test) else splits.val
    scores = []
    for name, (result, clf) in probes.items():
        x, y = train_val_features(clf, splits)
        scores.append(score_backbone(name, clf, x, y, result, k=k or RANKING_FOLDS, seed=seed, examples=examples))
    latencies = time_backbones([clf for _, clf in probes.values()], examples)
    return rank([with_latency(s, *ms) for s, ms in zip(scores, latencies)])


@dataclass(frozen=True)
class BackboneChoice:
    """auto's backbone step (`fit --models`): the backbone chosen, why, and the ranking behind it."""

    chosen: str
    reason: str
    ranking: Ranking

    def to_dict(self) -> dict:
        """transferkit.json's `backbone_choice` (the out-of-fold arrays left out: they are compare.json's)."""
        ranking = self.ranking.to_dict()
        for score in ranking["scores"]:
            score.pop("oof_correct")
        return {"chosen": self.chosen, "reason": self.reason, "ranking": ranking}


def choose_backbone(splits: DataSplits, models: Sequence[str], *, settings: dict | None = None, cv: int | None = None) -> BackboneChoice:
    """Rank `models` on the split by the frozen-feature probe's k-fold accuracy on train + val; the first is chosen.

    Each backbone's features are extracted once (then cached), so a second call costs the probes. The most
    accurate by the cross-validated probe is chosen (accuracy first, as auto decides strategies); when another
    is as accurate within noise and faster, the reason says so and how to pick it.

    Example:
        >>> choice = choose_backbone(load_data("digits"), ["builtin:efficientnet_lite0", "builtin:efficientnet_lite1"])  # doctest: +SKIP
        >>> ImageClassifier(choice.chosen).fit("digits")  # doctest: +SKIP
    """
    names = check_several_models(models, (), None, cv)
    if len(names) < 2:
        raise UsageError(f"--models needs at least two backbones to choose from; got '{','.join(names)}'. Give one backbone with --model.")
    settings = dict(settings or {})
    probes = {name: run_strategy(splits, "feature-extraction", model=name, settings=settings) for name in names}
    ranking = rank_backbones(probes, splits, cv, settings.get("seed") or 0)
    best = ranking.best
    reason = (
        f"{best.model} ranks first of {len(names)} backbones by the {best.cv['k']}-fold probe on {best.cv['n']} "
        f"train+val {splits.train.noun}s: {format_interval(best.cv['accuracy'], best.cv['low'], best.cv['high'])}"
    )
    if ranking.recommended != best.model:
        reason += f"; {ranking.reason.removesuffix(': choose it.')}: pass --model {ranking.recommended} to prefer speed"
    log.info("Backbone: %s.", reason)
    return BackboneChoice(best.model, reason + ".", ranking)


def trainable_params(clf) -> int:
    """Parameters the strategy's last phase trained (head plus its unfrozen blocks)."""
    counts = clf.backbone_.param_counts()
    blocks = clf.phases_[-1].trainable_blocks or []
    return counts["head"] + sum(counts[b] for b in blocks)


def check_strategies(strategies: Sequence[str], baseline: str | None) -> list[str]:
    """The canonical specs of the strategies to compare; 'auto', a repeat or an unknown baseline is refused."""
    specs = [parse_strategy(s).spec for s in strategies]
    if "auto" in specs:
        raise UsageError("compare measures concrete strategies; leave 'auto' out (fit --strategy auto uses them).")
    if len(set(specs)) != len(specs):
        raise UsageError(f"--strategies lists a strategy twice: {', '.join(strategies)}.")
    if baseline not in (None, "scratch"):
        raise UsageError(f"--baseline must be 'scratch'; got '{baseline}'.")
    return specs


def strategies_for(names: Sequence[str | None], strategies: Sequence[str] | None, baseline: str | None) -> list[str]:
    """The canonical specs compare runs: those given, else DEFAULT_STRATEGIES with one backbone and
    feature-extraction alone (the cheap ranking) with several."""
    return check_strategies(strategies or (("feature-extraction",) if len(names) > 1 else DEFAULT_STRATEGIES), baseline)


def check_runs(modality: str, names: Sequence[str | None], specs: Sequence[str], settings: dict) -> None:
    """Each backbone x strategy checked as its fit checks it (names, settings, lora's applicability), before any data
    is read: a bad --model must not cost a data scan and a feature extraction first."""
    for name in names:
        for spec in specs:
            CLASSIFIERS[modality](name, strategy=spec, **settings).check_settings()


def comparison_options(splits: DataSplits, data_name: str, names: Sequence[str | None], specs: Sequence[str], **more) -> dict:
    """What a comparison is of, kept in compare.json: ``compare --resume`` continues only one with the same data (its
    files and their split), backbones, strategies, seeds and settings (`more`)."""
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    ids = (f"{n}:{i}" for n, part in parts.items() for i in part.identities())
    digest = hashlib.sha256("\n".join(ids).encode())
    settings = {k: v for k, v in (more.pop("settings", None) or {}).items() if k != "progress"}
    return {
        "source": data_name,
        "data": digest.hexdigest()[:16],
        "models": list(names),
        "strategies": list(specs),
        **more,
        "settings": settings,
    }


def compare(
    splits: DataSplits,
    *,
    data_name: str,
    model: str | None = None,
    strategies: Sequence[str] | None = None,
    fractions: Sequence[float] = (),
    baseline: str | None = None,
    settings: dict | None = None,
    on_result=None,
    tracker: Tracker | None = None,
    seeds: int = 1,
    cv: int | None = None,
    models: Sequence[str] | None = None,
    resume_from: dict | None = None,
    on_partial: Callable[[Comparison], object] | None = None,
) -> Comparison:
    """Run every strategy on the same split and seed; optionally a learning curve and a scratch baseline.

    Args:
        splits: the data, split once for every strategy.
        model: the backbone (None: the default one).
        strategies: strategy specs (no 'auto': compare measures what auto would choose from); None: the four of
            DEFAULT_STRATEGIES with one backbone, feature-extraction alone (the cheap ranking) with several.
        fractions: training-set fractions per class for a learning curve (1.0 = the full run above).
        baseline: "scratch" adds the same architecture trained from random initialisation (finetune:all).
        settings: classifier settings shared by every run (epochs, image_size or max_length, seed, ...).
        on_result: called with each StrategyResult as it finishes (for live output).
        tracker: an open experiment-tracking run; each strategy (and curve point, baseline) is logged as a run nested in it.
        seeds: training seeds per strategy (seed, seed + 1, ...) on the same split; the table shows mean +- sd.
        cv: folds of the cross-validated probe on train + val; None for the default rule (`cv_probe`), 0 for none.
        models: several backbones: every backbone x strategy on the split, and the backbones ranked
            (`Comparison.ranking`: cross-validated probe, LogME, costs, the fastest within noise of the best).
        resume_from: the compare.json of an interrupted comparison (its content): with the same options (else a
            UsageError naming each difference), the backbone x strategy x seeds it finished are not trained again.
        on_partial: called with the unfinished Comparison after every backbone x strategy x seed that finishes
            (the CLI writes it, so an interruption keeps what finished).
    """
    check_repeats(seeds, cv)
    names = check_models(model, models, fractions, baseline, cv)
    settings = dict(settings or {})
    specs = strategies_for(names, strategies, baseline)
    check_runs(splits.train.modality, names, specs, settings)
    options = comparison_options(
        splits, data_name, names, specs, seeds=seeds, cv=cv, fractions=list(fractions), baseline=baseline, settings=settings
    )
    finished = finished_results(resume_from, options) if resume_from is not None else []
    notify = on_result or (lambda r: None)
    partial = Partial(splits, data_name, names, seeds, settings, options, on_partial, after=_steps_after(names, fractions, baseline, cv))
    results, probes, fitted = _run_grid(splits, names, specs, seeds, settings, tracker, notify, finished, partial)
    for name in names:
        if name not in probes and (cv != 0 or len(names) > 1):  # the probe's features come from the cache
            probes[name] = run_strategy(splits, "feature-extraction", model=name, settings=settings)
            partial.shown.setdefault(name, probes[name][1].backbone_.spec.name)
    seed = settings.get("seed") or 0
    several = {n: probe for n, probe in probes.items() if n is not None}  # all of them when len(names) > 1: --models names each
    ranking = rank_backbones(several, splits, cv, seed) if len(names) > 1 else None
    cv_result = cv_probe(probes[names[0]][1], splits, cv, seed) if cv != 0 and ranking is None else None
    curve = _learning_curve(splits, specs, fractions, model, settings, tracker, notify)
    if curve:
        curve.extend(results)
    base = None
    if baseline == "scratch":
        base, _ = run_strategy(
            splits,
            "finetune:all",
            model=model,
            settings=settings,
            weights="none",
            label="scratch (random init, finetune:all)",
            tracker=tracker,
        )
        notify(base)
    c = partial.comparison(results, [], curve=curve, baseline=base, cv=cv_result, ranking=ranking)
    c.extras = report_extras(fitted, c.winner().label, data_name)
    return c


def finished_results(saved: dict, options: dict) -> list[StrategyResult]:
    """The results an interrupted comparison wrote (compare.json's content), checked to be of the same options.

    Raises:
        UsageError: it was written for other data or options (each difference named with both values), or by a
            transferkit that did not record its options.
    """
    from transferkit.training.checkpoints import fingerprint_diff

    before, now = saved.get("options"), json.loads(json.dumps(options))  # as JSON holds them: tuples are lists
    if not isinstance(before, dict):
        raise UsageError(
            "compare.json does not record its options (written by an older transferkit), so it cannot be "
            "continued; compare again without --resume."
        )
    if before != now:
        diff = "; ".join(fingerprint_diff(before, now, saved_in="compare.json"))
        raise UsageError(
            f"compare.json was written for a different comparison ({diff}). Resume with the same data and "
            "options, or compare into another --out without --resume."
        )
    return [StrategyResult.from_dict(r) for r in saved.get("results") or []]


@dataclass
class Partial:
    """What a comparison's record needs besides its results; `save` hands the unfinished one to `on_partial`."""

    splits: DataSplits
    data_name: str
    names: list[str | None]
    seeds: int
    settings: dict
    options: dict
    on_partial: Callable[[Comparison], object] | None
    after: list[str] = field(default_factory=list)  # what runs after the strategies (pending until the end)
    shown: dict = field(default_factory=dict)  # backbone as given -> the name it goes by

    def comparison(self, results: list[StrategyResult], pending: list[str], **more) -> Comparison:
        return Comparison(
            data=self.data_name,
            model=",".join(self.shown.get(n, n or "default") for n in self.names),
            seed=self.settings.get("seed") or 0,
            results=results,
            configs={r.label: [p.to_dict() for p in r.phases] for r in results},
            machine=machine_info(),
            split_sizes=self.splits.sizes(),
            versions=library_versions(),
            seeds=self.seeds,
            noun=f"{self.splits.train.noun}s",
            train_class_counts=list(self.splits.train.class_counts().values()),
            pending=pending,
            options=self.options,
            **more,
        )

    def save(self, results: list[StrategyResult], labels: list[str]) -> None:
        if self.on_partial is not None:
            complete = {r.label for r in results if len(r.runs) >= self.seeds}
            self.on_partial(self.comparison(results, [label for label in labels if label not in complete] + self.after))


def _steps_after(names: list[str | None], fractions: Sequence[float], baseline: str | None, cv: int | None) -> list[str]:
    """What compare runs after the strategies, as an unfinished comparison lists it among what is still to run."""
    steps = {
        "learning curve": any(f < 1 for f in fractions),
        "scratch baseline": baseline == "scratch",
        "backbone ranking": len(names) > 1,
        "cross-validated probe": cv != 0 and len(names) == 1,
    }
    return [step for step, runs in steps.items() if runs]


def _run_grid(
    splits: DataSplits,
    names: list[str | None],
    specs: list[str],
    seeds: int,
    settings: dict,
    tracker: Tracker | None,
    notify,
    finished: Sequence[StrategyResult],
    partial: Partial,
) -> tuple[list[StrategyResult], dict, dict]:
    """Every backbone x strategy x seed in order, each handed to `partial` as it finishes; seeds in `finished` kept.

    Returns the results, the feature-extraction fits by backbone (the probes) and the classifiers by label."""
    previous = {r.label: r for r in finished}
    labels = [f"{name} / {spec}" if len(names) > 1 else spec for name in names for spec in specs]
    results: list[StrategyResult] = []
    probes: dict = {}
    fitted: dict = {}
    for (name, spec), label in zip(itertools.product(names, specs), labels):
        result, clf = run_seeds(
            splits,
            spec,
            seeds,
            model=name,
            settings=settings,
            tracker=tracker,
            label=label,
            started=previous.get(label),
            on_seed=lambda r: partial.save([*results, r], labels),
        )
        results.append(result)
        if clf is not None:
            partial.shown[name] = clf.backbone_.spec.name  # the name it goes by, not the spelling given
            fitted[label] = clf
            if spec == "feature-extraction":
                probes[name] = (result, clf)
        notify(result)
    return results, probes, fitted


def _learning_curve(
    splits: DataSplits, specs: list[str], fractions: Sequence[float], model: str | None, settings: dict, tracker: Tracker | None, notify
) -> list[StrategyResult]:
    """Every strategy again on per-class fractions of the training split (the same val and test)."""
    curve = []
    for fraction in sorted(f for f in fractions if f < 1):
        sub = DataSplits(subsample_per_class(splits.train, fraction, settings.get("seed") or 0), splits.val, splits.test, splits.summary)
        for spec in specs:
            result, _ = run_strategy(sub, spec, model=model, settings=settings, label=f"{spec} @ {fraction:g}", tracker=tracker)
            curve.append(result)
            notify(result)
    return curve


def report_extras(fitted: dict, best: str, data_name: str) -> dict | None:
    """The report's mistakes gallery (of the best strategy's first seed) and data doctor (from whichever fit cached
    the features of every split; no extra work), as each fit computed them."""
    extras = getattr(fitted.get(best), "report_extras_", None)  # none for a result kept from an interrupted run
    if not extras:
        return None
    doctor = next(
        (clf.report_extras_["doctor"] for clf in fitted.values() if (getattr(clf, "report_extras_", None) or {}).get("doctor")), None
    )
    return extras | {"doctor": doctor, "data": data_name, "best": best}
