"""One fit from settings to a fitted model, and the fitted state both `fit` and `load` leave on an estimator.

:func:`fit` joins the process group (torchrun), loads the data, loads the
backbone, runs the strategy's phases with the trainer and measures the test
split; :class:`Fitted` is the result, written to and read back from a run's
transferkit.json, so a loaded classifier carries exactly what a fitted one does.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit import distributed
from transferkit.backbones.base import Backbone
from transferkit.cache.features import FeatureCache
from transferkit.data.examples import DataSplits
from transferkit.inference.extraction import resolve_device, resolve_precision
from transferkit.runs.meta import PhaseRecord, RunMeta, StrategyRecord
from transferkit.stats.metrics import metrics, softmax
from transferkit.tracking import FitLog, Tracker
from transferkit.training.checkpoints import Checkpoints
from transferkit.training.config import TrainConfig
from transferkit.training.loop import seed_everything
from transferkit.training.strategies import AutoDecision, Strategy, parse_strategy
from transferkit.training.trainer import Precision, Trainer, run_strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReportInputs:
    """What a fit's report adds beside its metrics, while the examples are at hand: the test split's probabilities
    (the mistakes gallery) and the pretrained features of every split when the fit cached them (the doctor's cheap
    checks; None otherwise). :func:`transferkit.report.doctor.fit_extras` renders them."""

    splits: DataSplits
    test_probs: np.ndarray
    features: dict[str, np.ndarray] | None
    data_name: str
    model_name: str


@dataclass(kw_only=True)
class Fitted:
    """A trained model and everything measured and decided on the way."""

    backbone: Backbone
    classes: list[str]
    strategy: Strategy
    decision: AutoDecision | None
    config: TrainConfig
    phases: list[PhaseRecord]
    history: list[dict]
    metrics: dict
    feature_cache: dict
    data_summary: dict
    report_inputs: ReportInputs | None = None  # what the report's gallery and doctor need; the estimator renders and drops it

    def attributes(self) -> dict:
        """The estimator's fitted attributes (names end in `_`)."""
        return {
            "backbone_": self.backbone,
            "model_": self.backbone.model.eval(),
            "classes_": list(self.classes),
            "data_config_": dict(self.backbone.data_config),
            "strategy_": self.strategy,
            "decision_": self.decision,
            "config_": self.config,
            "phases_": self.phases,
            "history_": self.history,
            "metrics_": self.metrics,
            "feature_cache_": self.feature_cache,
            "data_summary_": self.data_summary,
        }

    def to_meta(self, requested: str) -> RunMeta:
        """The run's record (transferkit.json's content)."""
        return RunMeta(
            modality=self.backbone.modality,
            backbone=self.backbone.spec.to_dict(),
            classes=self.classes,
            data_config=jsonable(self.backbone.data_config),
            strategy=StrategyRecord(
                spec=self.strategy.spec,
                requested=requested,
                phases=self.phases,
                auto=self.decision.to_dict() if self.decision else None,
            ),
            training=self.config.to_dict(),
            feature_cache=self.feature_cache,
            data=self.data_summary,
            metrics=self.metrics,
            history=self.history,
        )

    @classmethod
    def from_meta(cls, backbone: Backbone, meta: RunMeta) -> Fitted:
        known = {k: v for k, v in meta.training.items() if k in TrainConfig.names()}
        return cls(
            backbone=backbone,
            classes=list(meta.classes),
            strategy=parse_strategy(meta.strategy.spec),
            decision=AutoDecision.from_dict(meta.strategy.auto) if meta.strategy.auto else None,
            config=TrainConfig(**known),
            phases=list(meta.strategy.phases),
            history=meta.history,
            metrics=meta.metrics,
            feature_cache=meta.feature_cache,
            data_summary=meta.data,
        )


@dataclass
class FitRequest:
    """What a fit needs besides the training config: where data and backbone come from, and the run's options."""

    load_splits: Callable[[int], DataSplits]  # seed -> splits
    new_backbone: Callable[[DataSplits], Backbone]  # a pretrained backbone with a new head for the splits' classes
    strategy: Strategy
    bn: str = "all-frozen"
    cache: bool = True
    cache_budget_gb: float = 0.0
    progress: bool = False
    checkpoint_dir: Path | None = None
    resume: bool = False
    tracker: Tracker | None = None
    tracked: dict | None = None  # the estimator's settings, for the experiment tracker


def fit(request: FitRequest, cfg: TrainConfig) -> Fitted:
    """Data, backbone, the strategy's phases and the test measurement; logs what happens as it happens."""
    device = distributed.join(resolve_device(cfg.device))  # under torchrun: this process's device
    distributed.local_batch(cfg.batch_size)  # fail now if the global batch does not split over the processes
    started = time.perf_counter()
    splits = _load_splits(request, cfg)
    sizes = splits.sizes()
    fit_log = FitLog(request.tracker)
    fit_log.start(
        {**(request.tracked or {}), **cfg.to_dict(), "data": {"source": splits.summary.source, **sizes, "classes": len(splits.classes)}}
    )
    seed_everything(cfg.seed)
    with distributed.main_first():  # hub weights: one download, then the others read the hub cache
        bb = request.new_backbone(splits)
    log.info("Backbone: %s (%s)", bb.spec.name, bb.load_report)
    precision = Precision(resolve_precision(cfg.precision, device), resolve_precision(cfg.precision, device, training=True))
    trainer = Trainer(
        bb,
        splits,
        cfg,
        device=device,
        precision=precision,
        bn=request.bn,
        cache=FeatureCache.default(enabled=request.cache),
        cache_budget_gb=request.cache_budget_gb,
        progress=request.progress and distributed.is_main(),
        checkpoints=_checkpoints(request, cfg, splits, bb),
    )
    trainer.on_epochs = fit_log.epochs
    strategy, phases, results, decision = run_strategy(
        trainer, request.strategy, cfg, lambda: request.new_backbone(splits), resume=request.resume
    )
    fitted, test_logits = _measured(trainer, strategy, decision, phases, results, started)
    fitted.report_inputs = _report_inputs(trainer, splits, test_logits)
    fit_log.end(fitted.to_meta(request.strategy.spec))
    return fitted


def _load_splits(request: FitRequest, cfg: TrainConfig) -> DataSplits:
    """The data, split; its sizes and any warning about it logged."""
    with distributed.main_first():  # one process downloads a named dataset, the others then read it
        splits = request.load_splits(cfg.seed)
    sizes = splits.sizes()
    log.info(
        "Data: %d train / %d val / %d test %ss, %d classes",
        sizes["train"],
        sizes["val"],
        sizes["test"],
        splits.train.noun,
        len(splits.classes),
    )
    if splits.summary.line():
        log.warning(splits.summary.line())
    return splits


def _measured(
    trainer: Trainer, strategy: Strategy, decision: AutoDecision | None, phases: list, results: list, started: float
) -> tuple[Fitted, np.ndarray]:
    """The trained model calibrated and measured on the test split, as a Fitted; and the test logits."""
    splits, cfg = trainer.splits, trainer.cfg
    calibration = calibrate(trainer, phases[-1])
    test_logits = trainer.logits("test", phases[-1])
    test = metrics(test_logits, splits.test.labels, list(splits.classes), ids=splits.test.ids(), seed=cfg.seed)
    if calibration is not None and len(splits.test):
        calibration.update(
            test_ece_before=scaled_ece(test_logits, splits.test.labels, calibration["temperature"]), test_ece_after=test["ece"]
        )
    measured = {
        "test": test,
        "val_accuracy": max(r.best_val_acc for r in results),
        "train_seconds": time.perf_counter() - started,
        "split_sizes": splits.sizes(),
        "calibration": calibration,
        "feature_seconds": dict(trainer.feature_seconds),
    }
    fitted = Fitted(
        backbone=trainer.bb,
        classes=list(splits.classes),
        strategy=strategy,
        decision=decision,
        config=cfg,
        phases=[_phase_record(p, r, trainer.phase_notes) for p, r in zip(phases, results)],
        history=[row for r in results for row in r.history],
        metrics=measured,
        feature_cache=dict(trainer.cache_hits) | ({"engine": trainer.feature_engine} if trainer.feature_engine else {}),
        data_summary={**splits.summary.to_dict(), "train_class_counts": list(splits.train.class_counts().values())},
    )
    return fitted, test_logits


def _report_inputs(trainer: Trainer, splits: DataSplits, test_logits) -> ReportInputs | None:
    """The report's mistakes gallery and the data doctor's cheap checks, on features the fit already cached."""
    if not distributed.is_main():
        return None
    cached = all(s in trainer.cache_hits for s in ("train", "val", "test"))  # else computing them costs a pass
    features = {s: trainer.features(s) for s in ("train", "val", "test")} if cached else None
    return ReportInputs(
        splits=splits, test_probs=softmax(test_logits), features=features, data_name=splits.summary.source, model_name=trainer.bb.spec.name
    )


def calibrate(trainer: Trainer, last) -> dict | None:
    """Temperature scaling (Guo et al. 2017): T fitted on validation logits, folded into the head (W/T, b/T).

    Every consumer of the model (predict, export, plain timm) then gets the calibrated probabilities; the
    argmax, hence every prediction and accuracy, is unchanged. None (and the model left as it is) when there
    is no validation set, a single class, or a head that is not one linear layer.
    """
    import torch

    from transferkit.stats.calibration import fit_temperature, fold_temperature_

    labels, head = trainer.splits.val.labels, trainer.bb.head()
    if len(labels) == 0 or len(trainer.splits.classes) < 2 or not isinstance(head, torch.nn.Linear):
        log.info(
            "No calibration: %s.",
            "no validation set"
            if len(labels) == 0
            else "a single class"
            if len(trainer.splits.classes) < 2
            else f"the head is a {type(head).__name__}, not one linear layer",
        )
        return None
    logits = trainer.logits("val", last)
    t = fit_temperature(logits, labels)
    fold_temperature_(head, t)
    before, after = scaled_ece(logits, labels, 1.0), scaled_ece(logits, labels, 1.0 / t)
    log.info(
        "Calibration: temperature %.3f fitted on %d validation %s (ECE %.4f -> %.4f), folded into the head.",
        t,
        len(labels),
        trainer.bb.noun,
        before,
        after,
    )
    return {
        "temperature": t,
        "val_ece_before": before,
        "val_ece_after": after,
        "n_val": len(labels),
        "method": "temperature scaling (Guo et al. 2017) on validation logits, L-BFGS on "
        "the NLL; folded into the head (weights and bias divided by T); ECE with "
        "15 equal-width bins",
    }


def scaled_ece(logits, labels, scale: float) -> float:
    """ECE of softmax(logits * scale): scale T undoes a folded temperature, 1/T applies one."""
    from transferkit.stats.calibration import expected_calibration_error
    from transferkit.stats.metrics import softmax

    return expected_calibration_error(softmax(logits * scale), labels)


def _checkpoints(request: FitRequest, cfg: TrainConfig, splits: DataSplits, bb: Backbone) -> Checkpoints | None:
    """What a checkpoint must match to be resumed: data, model, strategy and every setting that changes training."""
    if request.checkpoint_dir is None:
        return None
    data = hashlib.sha256("\n".join(splits.train.identities() + splits.val.identities()).encode()).hexdigest()[:16]
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "workers")}
    fingerprint = {
        "model": bb.spec.name,
        "weights": bb.spec.weights,
        "strategy": request.strategy.spec,
        "bn": request.bn,
        "preprocessing": jsonable(bb.data_config),
        "data": data,
        "settings": settings,
    }
    return Checkpoints(Path(request.checkpoint_dir), fingerprint)


def jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _phase_record(phase, result, notes: dict) -> PhaseRecord:
    return PhaseRecord(
        name=phase.name,
        on_features=phase.on_features,
        epochs_run=len(result.history),
        best_epoch=result.best_epoch,
        best_val_acc=result.best_val_acc,
        seconds=round(result.seconds, 3),
        **notes.get(phase.name, {}),
    )
