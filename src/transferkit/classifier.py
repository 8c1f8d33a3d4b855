"""`ImageClassifier`: the library's public verbs in scikit-learn's estimator shape.

The constructor only stores settings; `fit` validates, trains and returns
self; fitted state ends in `_`; `predict` before `fit` says so.

Example:
    >>> clf = ImageClassifier("efficientnet_lite0", strategy="feature-extraction")
    >>> clf.fit("digits").score("digits")      # doctest: +SKIP
    0.96
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from transferkit import backbones as bbs
from transferkit.data import (
    DEFAULT_SPLIT,
    DataSplits,
    DataSummary,
    FileImages,
    ImageSet,
    TransformedImages,
    load_data,
    load_eval_images,
    make_transform,
    resolve_data_config,
    split_stratified,
)
from transferkit.engine import (
    HEAD_LR,
    PhaseResult,
    TrainConfig,
    fit_linear_probe,
    predict_logits,
    resolve_device,
    resolve_precision,
    run_phase,
    seed_everything,
)
from transferkit.errors import NotFittedError, UsageError
from transferkit.evaluate import metrics
from transferkit.features import FeatureCache, cached_features, default_workers
from transferkit.runs import LoadedRun, load_run, save_run
from transferkit.strategies import BN_POLICIES, Phase, parse_strategy, plan_phases


class ImageClassifier:
    """Adapt a pretrained image backbone to labelled images.

    Args:
        model: built-in name (``efficientnet_lite0``) or any timm model name.
        strategy: ``feature-extraction``, ``finetune:last=N``, ``finetune:all``, ``lp-ft``, ``gradual`` or ``auto``.
        weights: a local .safetensors/.pth file, ``"none"`` for random init, or None for the default source.
        image_size: input size in pixels; None takes the backbone's (or a built-in dataset's) default.
        bn: BatchNorm policy: ``frozen-blocks`` (frozen blocks keep stored statistics) or ``all-frozen``.
        cache: use the on-disk feature cache.
        progress: show progress bars on stderr.
        Other keyword arguments are :class:`transferkit.engine.TrainConfig` fields.
    """

    def __init__(self, model: str = bbs.DEFAULT_BACKBONE, *, strategy: str = "feature-extraction",
                 weights: str | Path | None = None, image_size: int | None = None, bn: str = "frozen-blocks",
                 split: Sequence[float] = DEFAULT_SPLIT, strict: bool = False, cache: bool = True,
                 progress: bool = True, **train):
        self.model = model
        self.strategy = strategy
        self.weights = weights
        self.image_size = image_size
        self.bn = bn
        self.split = split
        self.strict = strict
        self.cache = cache
        self.progress = progress
        self.train = train

    # ------------------------------------------------------------------ fit

    def fit(self, X, y: Sequence | None = None) -> ImageClassifier:
        """Train on a data source (folder, CSV, ``digits``, torchvision name), (paths, labels), or a DataSplits."""
        cfg = self._config()
        strategy = parse_strategy(self.strategy)
        if self.bn not in BN_POLICIES:
            raise UsageError(f"bn must be one of {', '.join(BN_POLICIES)}; got '{self.bn}'.")
        splits = self._splits(X, y, cfg.seed)
        self.data_summary_ = splits.summary
        started = time.perf_counter()
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        dtype = resolve_precision(cfg.precision, device)
        bb = bbs.load_backbone(self.model, len(splits.classes), weights=self.weights)
        data_config = resolve_data_config(bb.data_config, self.image_size, splits.train.preprocess_hint)
        if strategy.kind == "auto":
            raise UsageError("strategy 'auto' is not available yet; choose feature-extraction.")
        phases = plan_phases(strategy, cfg.epochs, cfg.head_epochs, len(bb.blocks))
        trainer = _Trainer(bb, splits, data_config, cfg, device, dtype, self.bn, self.cache, self.progress)
        results = [trainer.run(phase) for phase in phases]
        test_logits = trainer.test_logits(phases[-1])

        self.backbone_ = bb
        self.model_ = bb.model.eval()
        self.classes_ = list(splits.classes)
        self.data_config_ = data_config
        self.strategy_ = strategy
        self.config_ = cfg
        self.history_ = [row for r in results for row in r.history]
        self.phases_ = [_phase_record(p, r, trainer) for p, r in zip(phases, results)]
        self.feature_cache_ = trainer.cache_hits
        self.metrics_ = {"test": metrics(test_logits, splits.test.labels, self.classes_),
                         "val_accuracy": results[-1].best_val_acc, "train_seconds": time.perf_counter() - started,
                         "split_sizes": splits.sizes()}
        return self

    def _config(self) -> TrainConfig:
        try:
            return TrainConfig(**self.train)
        except TypeError as e:
            valid = ", ".join(TrainConfig.__dataclass_fields__)
            raise UsageError(f"ImageClassifier got an unknown setting ({e}). Valid: {valid}.") from e

    def _splits(self, X, y, seed: int) -> DataSplits:
        if isinstance(X, DataSplits):
            return X
        if y is not None:
            paths = [Path(p) for p in X]
            if len(paths) != len(y):
                raise UsageError(f"fit got {len(paths)} paths and {len(y)} labels; they must pair up.")
            classes = sorted({str(v) for v in y})
            images = FileImages(paths, [classes.index(str(v)) for v in y], classes, name="paths")
            return DataSplits(*split_stratified(images, self.split, seed, "the given paths"), DataSummary("paths", len(paths)))
        return load_data(X, split=self.split, seed=seed, strict=self.strict)

    # ------------------------------------------------------------------ predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("This ImageClassifier is not fitted yet: call fit(...) or ImageClassifier.load(run_dir).")

    def predict_proba(self, X: Sequence[str | Path] | ImageSet, batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per image (columns follow `classes_`)."""
        return _softmax(self.decision_function(X, batch_size))

    def decision_function(self, X: Sequence[str | Path] | ImageSet, batch_size: int = 64) -> np.ndarray:
        """Raw logits, one row per image."""
        self._check_fitted()
        images = X if isinstance(X, ImageSet) else FileImages(list(X), [0] * len(X), self.classes_, name="predict")
        device = resolve_device(self._predict_setting("device"))
        dtype = resolve_precision(self._predict_setting("precision"), device)
        loader = torch.utils.data.DataLoader(TransformedImages(images, make_transform(self.data_config_)),
                                             batch_size=batch_size, num_workers=default_workers(images))
        model = self.model_.to(device)
        if dtype is not None:
            model = model.to(memory_format=torch.channels_last)
        logits, _ = predict_logits(model, loader, device, dtype)
        return logits

    def _predict_setting(self, name: str) -> str:
        return self.train.get(name, "auto")

    def predict(self, X: Sequence[str | Path] | ImageSet) -> list[str]:
        """Predicted class names."""
        return [self.classes_[i] for i in self.decision_function(X).argmax(1)]

    def score(self, X, y: Sequence | None = None) -> float:
        """Accuracy on a data source (all its images), an ImageSet, or (paths, labels)."""
        self._check_fitted()
        if y is not None:
            images: ImageSet = FileImages(list(X), [self.classes_.index(str(v)) for v in y], self.classes_)
        elif isinstance(X, ImageSet):
            images = X
        else:
            images, _ = load_eval_images(X, self.classes_, strict=self.strict)
        return float((self.decision_function(images).argmax(1) == images.labels).mean())

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write a run directory (model.safetensors, transferkit.json, metrics, history)."""
        self._check_fitted()
        out = Path(path)
        meta = {
            "backbone": self.backbone_.spec.to_dict() if hasattr(self, "backbone_") else self.backbone_meta_,
            "classes": self.classes_,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config_.items()},
            "strategy": {"spec": self.strategy_.spec, "requested": self.strategy, "bn": self.bn,
                         "phases": getattr(self, "phases_", [])},
            "training": self.config_.to_dict() if hasattr(self, "config_") else {},
            "feature_cache": getattr(self, "feature_cache_", {}),
            "data": self.data_summary_.to_dict() if hasattr(self, "data_summary_") else {},
            "metrics": getattr(self, "metrics_", {}),
        }
        save_run(out, self.model_, meta, getattr(self, "history_", None))
        return out

    @classmethod
    def load(cls, path: str | Path, **settings) -> ImageClassifier:
        """Load a run directory written by `save` (or `transferkit fit`)."""
        run: LoadedRun = load_run(path)
        meta = run.meta
        clf = cls(meta["backbone"].get("name", meta["backbone"]["arch"]), strategy=meta["strategy"].get("spec", "auto"),
                  **settings)
        clf.model_ = run.model
        clf.classes_ = run.classes
        clf.backbone_meta_ = meta["backbone"]
        clf.data_config_ = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
        clf.strategy_ = parse_strategy(meta["strategy"].get("spec", "feature-extraction"))
        clf.metrics_ = meta.get("metrics", {})
        clf.meta_ = meta
        return clf


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _phase_record(phase: Phase, result: PhaseResult, trainer: _Trainer) -> dict:
    return {"name": phase.name, "on_features": phase.on_features, "epochs_run": len(result.history),
            "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc, "seconds": round(result.seconds, 3),
            **trainer.phase_notes.get(phase.name, {})}


class _Trainer:
    """Runs phases for one fit: builds loaders, applies freezing and BN policy, calls the engine."""

    def __init__(self, bb: bbs.Backbone, splits: DataSplits, data_config: dict, cfg: TrainConfig,
                 device: torch.device, dtype: torch.dtype | None, bn: str, cache: bool, progress: bool):
        self.bb, self.splits, self.data_config, self.cfg = bb, splits, data_config, cfg
        self.device, self.dtype, self.bn, self.progress = device, dtype, bn, progress
        self.cache = FeatureCache.default(enabled=cache)
        self.eval_transform = make_transform(data_config)
        self.cache_hits: dict[str, str] = {}
        self.phase_notes: dict[str, dict] = {}
        self._features: dict[str, np.ndarray] = {}

    def features(self, split: str) -> np.ndarray:
        if split not in self._features:
            images = getattr(self.splits, split)
            arr, hit = cached_features(self.bb, images, self.eval_transform, self.data_config, cache=self.cache,
                                       device=self.device, dtype=self.dtype, workers=self.cfg.workers,
                                       progress=self.progress, label=f"{split} ({len(images)} images)")
            self.cache_hits[split] = "hit" if hit else ("miss" if self.cache.enabled else "off")
            self._features[split] = np.asarray(arr, dtype=np.float32)
        return self._features[split]

    def _feature_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.features(split)), torch.from_numpy(getattr(self.splits, split).labels)

    def _feature_loader(self, split: str, shuffle: bool):
        data = torch.utils.data.TensorDataset(*self._feature_tensors(split))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.utils.data.DataLoader(data, batch_size=self.cfg.batch_size, shuffle=shuffle, generator=gen)

    def _image_loader(self, split: str, train: bool):
        images = getattr(self.splits, split)
        transform = make_transform(self.data_config, self.cfg.augment) if train else self.eval_transform
        gen = torch.Generator().manual_seed(self.cfg.seed)
        workers = default_workers(images) if self.cfg.workers is None else self.cfg.workers
        return torch.utils.data.DataLoader(TransformedImages(images, transform), batch_size=self.cfg.batch_size,
                                           shuffle=train, generator=gen, num_workers=workers,
                                           drop_last=train and len(images) > self.cfg.batch_size)

    def run(self, phase: Phase) -> PhaseResult:
        head_lr = self.cfg.lr or HEAD_LR
        if phase.on_features and phase.solver == "lbfgs":
            result = fit_linear_probe(self.bb.head(), self._feature_tensors("train"), self._feature_tensors("val"),
                                      progress=self.progress, name=phase.name)
            self.phase_notes[phase.name] = {"trainable_blocks": [], "solver": "lbfgs",
                                            "C": result.history[result.best_epoch - 1]["C"]}
            return result
        if phase.on_features:
            head = self.bb.head()
            groups = [{"name": "head", "params": list(head.parameters()), "lr": head_lr, "lr_scale": 1.0}]
            self.phase_notes[phase.name] = {"trainable_blocks": [], "solver": "adamw", "lrs": {"head": head_lr}}
            return run_phase(head, groups, self._feature_loader("train", True), self._feature_loader("val", False),
                             epochs=phase.epochs, cfg=self.cfg, device=torch.device("cpu"), dtype=None,
                             name=phase.name, progress=self.progress)
        raise UsageError(f"phase '{phase.name}' on images is not supported yet")

    def test_logits(self, last: Phase) -> np.ndarray:
        if last.on_features:
            head = self.bb.head().cpu().eval()
            with torch.no_grad():
                return head(torch.from_numpy(self.features("test"))).numpy()
        logits, _ = predict_logits(self.bb.model, self._image_loader("test", False), self.device, self.dtype)
        return logits
