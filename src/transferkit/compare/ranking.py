"""Which pretrained backbone? Each candidate measured on the user's data, with its costs.

Kornblith, Shlens and Le ("Do Better ImageNet Models Transfer Better?", CVPR
2019) found ImageNet accuracy predicts transfer accuracy across 16 networks, yet
on a given folder the order can turn round, so `compare --models a,b,c` measures
it. For every backbone, on its cached features:

* the frozen-feature probe's stratified k-fold accuracy on train + val with its
  Wilson interval (`evidence.cross_validated_probe`): the ranking's evidence,
  validation data only; the test accuracy of its feature-extraction run is shown
  beside it, not used;
* LogME (`logme.logme_score`, You et al., ICML 2021), a score from the features
  and labels alone, and how its order agrees with the probe's (Kendall's tau);
* costs: parameters, GFLOPs per example at the input size used
  (`torch.utils.flop_counter`, 2 FLOPs per multiply-add), latency per example at
  batch 1 and batch 32 through the forward pass `predict` runs (eval mode,
  channels-last, the precision's autocast), feature dimension, extraction time
  and peak memory.

Every backbone's out-of-fold predictions cover the same examples in the same
folds (same labels, same fold seed), so backbones are compared pairwise on them
(`evidence.paired_difference`); the recommendation is the fastest backbone
within noise of the best: "a is as accurate as b within noise and 2.1x faster".
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from transferkit.stats.crossval import cross_validated_probe
from transferkit.stats.logme import RankAgreement, kendall_tau, logme_score
from transferkit.stats.paired import PairedDifference, paired_difference
from transferkit.stats.wording import format_interval, ratio_phrase

log = logging.getLogger(__name__)

RANKING_FOLDS = 5  # with several backbones the cross-validated probe always runs: it is the ranking


@dataclass(frozen=True)
class Costs:
    """What one backbone costs to run; latencies are milliseconds per example, median of repeated timed passes."""

    params: int
    gflops: float | None  # per example at the input used; None where the flop counter cannot trace the model
    latency_ms_batch1: float
    latency_ms_batch32: float
    feature_dim: int
    extraction_seconds: float  # the pooled features of train, val and test: computed, or read from the cache
    extraction: str  # "computed", "cached" or "mixed"
    peak_memory_mib: float
    engine: str  # how latency was measured, e.g. "torch bfloat16 (cpu)"


@dataclass
class BackboneScore:
    """One backbone: the probe's cross-validated accuracy (the ranking), LogME, test accuracy beside, costs."""

    model: str
    cv: dict  # evidence.CVProbe.to_dict() without the probabilities
    logme: float
    test_accuracy: float
    test_low: float | None
    test_high: float | None
    costs: Costs
    oof_correct: np.ndarray = field(repr=False)  # (train + val,) out-of-fold correctness, the paired test's input
    against_best: PairedDifference | None = None  # this one's accuracy minus the best's, on the out-of-fold predictions

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "cv": self.cv,
            "logme": self.logme,
            "test_accuracy": self.test_accuracy,
            "test_low": self.test_low,
            "test_high": self.test_high,
            "costs": asdict(self.costs),
            "oof_correct": self.oof_correct.astype(int).tolist(),
            "against_best": self.against_best.to_dict() if self.against_best else None,
        }


@dataclass
class Ranking:
    """Backbones best first by the cross-validated probe, with the recommendation and its reason."""

    scores: list[BackboneScore]
    agreement: RankAgreement | None  # LogME's order against the probe's; None when either is constant
    recommended: str
    reason: str
    front: list[str]  # the Pareto front of (probe accuracy, batch-1 latency): no other backbone is better at both

    @property
    def best(self) -> BackboneScore:
        return self.scores[0]

    def to_dict(self) -> dict:
        return {
            "scores": [s.to_dict() for s in self.scores],
            "recommended": self.recommended,
            "reason": self.reason,
            "pareto_front": self.front,
            "logme_vs_probe_kendall": asdict(self.agreement) if self.agreement else None,
            "method": "rank: stratified k-fold linear probe on train+val (Wilson 95% CI); pairs: paired bootstrap "
            "and exact McNemar on the out-of-fold predictions; LogME (You et al. 2021) on the same "
            "features; latency: median ms per example through predict's forward pass",
        }


def score_backbone(model: str, clf, features: np.ndarray, labels: np.ndarray, result, *, k: int, seed: int, examples) -> BackboneScore:
    """Everything the ranking shows for one backbone but its latency (`time_backbones` adds it, for all at once).

    `clf` is the feature-extraction classifier fitted on the split (its backbone is the pretrained one below the head),
    `result` its StrategyResult, `features`/`labels` its train + val features, `examples` real examples to count FLOPs on.
    """
    cv = cross_validated_probe(features, labels, k=k, seed=seed)
    iv = (result.metrics.get("intervals") or {}).get("accuracy") or {}
    return BackboneScore(
        model,
        cv.to_dict(),
        logme_score(features, labels),
        result.test_accuracy,
        iv.get("low"),
        iv.get("high"),
        static_costs(clf, result, examples),
        cv.classes[cv.probabilities.argmax(1)] == labels,
    )


def static_costs(clf, result, examples) -> Costs:
    """Parameters, GFLOPs, feature size, extraction time and memory of one fitted backbone (latency: `time_backbones`)."""
    import torch

    from transferkit.inference.extraction import resolve_device

    bb = clf.backbone_
    device = resolve_device(clf.config_.device)
    seconds = clf.metrics_.get("feature_seconds") or {}
    status = {v for k, v in (clf.feature_cache_ or {}).items() if k in ("train", "val", "test")} or {"off"}
    extraction = "cached" if status == {"hit"} else "computed" if "hit" not in status else "mixed"
    example = _real_batch(bb, examples, 1).to(device)
    with torch.inference_mode():
        gflops = _gflops(bb.model.to(device).eval(), example)
    return Costs(
        bb.param_counts()["total"],
        gflops,
        0.0,
        0.0,
        bb.num_features,
        round(sum(seconds.values()), 3),
        extraction,
        result.peak_memory_mib,
        "",
    )


def time_backbones(
    clfs: list, examples, *, budget_s: float = 2.0, min_rounds: int = 5, max_rounds: int = 40
) -> list[tuple[float, float, str]]:
    """(batch-1, batch-32 median ms per example, engine) for each fitted classifier, timed in interleaved rounds.

    Each model runs through `ovengine.frozen_runner` with the classifier's engine and precision: the forward
    pass predict runs. Round r times every backbone once at each batch size before round r + 1 starts, so a
    change of load on the machine (other processes) falls on every backbone alike instead of on whichever ran
    then. Three warm-up passes each first (allocations, kernel selection for the shape).
    """
    import torch

    from transferkit.inference.extraction import resolve_device, resolve_precision
    from transferkit.inference.runners import frozen_runner

    jobs, engines = [], []
    for clf in clfs:
        device = resolve_device(clf.config_.device)
        dtype = resolve_precision(clf.config_.precision, device)
        batch = _real_batch(clf.backbone_, examples, 32)
        model = clf.backbone_.model.to(device).eval()
        if batch.ndim == 4 and dtype is not None:
            model = model.to(memory_format=torch.channels_last)
        run, info = frozen_runner(model, tuple(batch.shape[1:]), device=device, precision=dtype, engine=clf.config_.engine)
        jobs.append([_timer(run, _repeat_to(batch, n).to(device), device) for n in (1, 32)])
        engines.append(f"{info.name} {info.precision} ({device.type})")
    times: list[list[list[float]]] = [[[], []] for _ in jobs]
    with torch.inference_mode():
        for pair in jobs:
            for once in pair:
                for _ in range(3):
                    once()
        start, rounds = time.perf_counter(), 0
        while rounds < min_rounds or (time.perf_counter() - start < budget_s * len(jobs) and rounds < max_rounds):
            for i, pair in enumerate(jobs):
                for j, once in enumerate(pair):
                    times[i][j].append(once())
            rounds += 1
    return [(_ms_per_example(b1, 1), _ms_per_example(b32, 32), engine) for (b1, b32), engine in zip(times, engines)]


def _ms_per_example(seconds: list[float], batch: int) -> float:
    """The median of timed passes of one batch, in milliseconds per example (3 decimals)."""
    return round(float(np.median(seconds)) * 1000 / batch, 3)


def _timer(run, x, device):
    """A function timing one call of run(x) (a frozen runner: autocast, channels-last or OpenVINO), in seconds."""
    import torch

    def once() -> float:
        begin = time.perf_counter()
        run(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - begin

    return once


def _real_batch(bb, examples, n: int):
    """Up to n examples through the backbone's own preprocessing and collation: what predict feeds the model."""
    from torch.utils.data import default_collate

    data = bb.dataset(examples)
    return (bb.collate or default_collate)([data[i] for i in range(min(n, len(data)))])[0]


def _repeat_to(x, n: int):
    """Exactly n rows: the first n, or the rows repeated when the split is smaller."""
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:n] if reps > 1 else x[:n]


def _gflops(model, x) -> float | None:
    """Forward GFLOPs per example (torch's flop counter: matmuls and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        return round(counter.get_total_flops() / 1e9 / len(x), 4)
    except Exception as e:  # a model the counter cannot trace: its costs are still shown, without FLOPs
        log.info("No FLOP count for this model (%s: %s).", type(e).__name__, e)
        return None


def with_latency(score: BackboneScore, batch1_ms: float, batch32_ms: float, engine: str) -> BackboneScore:
    """The score with its measured latencies (ms per example) and the engine that ran them."""
    score.costs = replace(score.costs, latency_ms_batch1=batch1_ms, latency_ms_batch32=batch32_ms, engine=engine)
    return score


def rank(scores: list[BackboneScore]) -> Ranking:
    """Order by the probe's cross-validated accuracy, pair each backbone with the best, recommend, mark the front."""
    scores = sorted(scores, key=lambda s: -s.cv["accuracy"])
    best = scores[0]
    for s in scores[1:]:
        s.against_best = paired_difference(s.oof_correct, best.oof_correct)
    agreement = _agreement(scores)
    recommended, reason = recommend(scores)
    return Ranking(scores, agreement, recommended, reason, pareto_front(scores))


def _agreement(scores: list[BackboneScore]) -> RankAgreement | None:
    acc = np.array([s.cv["accuracy"] for s in scores])
    lm = np.array([s.logme for s in scores])
    if len(scores) < 2 or np.all(acc == acc[0]) or np.all(lm == lm[0]):
        return None
    return kendall_tau(lm, acc)


def recommend(scores: list[BackboneScore]) -> tuple[str, str]:
    """The fastest backbone (batch-1 latency) within noise of the best, and the sentence that says why."""
    best = scores[0]
    within = [best, *(s for s in scores[1:] if not _against_best(s).significant)]
    fastest = min(within, key=lambda s: s.costs.latency_ms_batch1)
    n, k = best.cv["n"], best.cv["k"]
    evidence = f"the {k}-fold probe on {n} train+val examples"
    if len(scores) == 1:
        return best.model, f"{best.model}: {_cv_text(best)} by {evidence} (one backbone: nothing to rank)."
    if fastest is best:
        rest = (
            "every other backbone is measurably less accurate"
            if len(within) == 1
            else f"{', '.join(s.model for s in within[1:])} within noise of it but slower"
        )
        return best.model, (
            f"{best.model} is the most accurate by {evidence}, {_cv_text(best)}, and the fastest of those within noise ({rest}): choose it."
        )
    d = _against_best(fastest)
    speed = ratio_phrase(fastest.costs.latency_ms_batch1, best.costs.latency_ms_batch1, what="latency")
    gap = format_interval(d.difference, d.low, d.high)
    return fastest.model, (
        f"{fastest.model} is as accurate as {best.model} within noise by {evidence} "
        f"({fastest.cv['accuracy']:.1%} vs {best.cv['accuracy']:.1%}; difference {gap.replace('%', ' points', 1)}"
        f", McNemar p = {d.mcnemar_p:.2g}) and {speed} at batch 1: choose it."
    )


def _against_best(s: BackboneScore) -> PairedDifference:
    """The score's paired test against the best, which `rank` sets on every score but the best's."""
    if s.against_best is None:
        raise ValueError(f"{s.model} has no paired test against the best backbone; rank(scores) pairs each with the best first.")
    return s.against_best


def _cv_text(s: BackboneScore) -> str:
    return format_interval(s.cv["accuracy"], s.cv["low"], s.cv["high"])


def pareto_front(scores: list[BackboneScore]) -> list[str]:
    """Backbones no other beats on both probe accuracy (higher) and batch-1 latency (lower), fastest first."""

    def dominated(a: BackboneScore) -> bool:
        return any(
            b.cv["accuracy"] >= a.cv["accuracy"]
            and b.costs.latency_ms_batch1 <= a.costs.latency_ms_batch1
            and (b.cv["accuracy"], b.costs.latency_ms_batch1) != (a.cv["accuracy"], a.costs.latency_ms_batch1)
            for b in scores
        )

    return [s.model for s in sorted(scores, key=lambda s: s.costs.latency_ms_batch1) if not dominated(s)]
