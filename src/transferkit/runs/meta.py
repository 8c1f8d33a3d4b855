"""A run's record, typed: what transferkit.json holds, and the record of each training phase.

`RunMeta` is the one reader and writer of transferkit.json's fields: a module that
needs the classes, the backbone or the test metrics of a run asks a `RunMeta`
(``meta.classes``, ``meta.test_metrics``), never a string key. The file's layout
is unchanged: `RunMeta.to_dict()` writes the keys transferkit has always written,
in the same order, and `RunMeta.from_dict` reads runs written by earlier versions
(absent fields take their defaults; fields it does not know are kept and written
back). Validation of a file read from disk (format version, required fields) is
:func:`transferkit.runs.directory.validate_meta`'s; this module only maps.

This module sits low (beside the other records, below training): training builds
these records and every layer above reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import PurePath
from typing import Any

FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PhaseRecord:
    """What one training phase did: its length, its best epoch on validation, and how it trained.

    The first six fields every phase has; the rest depend on where it trained (cached features or examples)
    and are None (left out of the file) where they do not apply.
    """

    name: str
    on_features: bool
    epochs_run: int
    best_epoch: int
    best_val_acc: float
    seconds: float
    trainable_blocks: list[str] | None = None
    solver: str | None = None  # phases on features: "lbfgs" (the probe) or "adamw"
    C: float | None = None  # the probe's chosen inverse regularisation strength
    lrs: dict[str, float] | None = None  # learning rate per param group
    bn: str | None = None  # BatchNorm policy of a fine-tuning phase
    prefix_cache: dict | str | None = None  # the frozen-prefix cache's use, or why it was not used
    decoded_cache: dict | None = None  # decode-once per split
    kept_previous: bool | None = None  # no epoch beat the previous phase on validation: its weights were kept
    extra: dict[str, Any] = field(default_factory=dict)  # fields of other versions, kept as they were

    @property
    def trained_epochs(self) -> int:
        """Epochs of gradient training (the probe's L-BFGS solve over regularisation strengths counts none)."""
        return 0 if self.on_features and self.solver == "lbfgs" else self.epochs_run

    def to_dict(self) -> dict[str, Any]:
        return _without_none(self) | self.extra

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseRecord:
        return _from_dict(cls, d)


@dataclass(frozen=True, kw_only=True)
class StrategyRecord:
    """The strategy a run trained with: its canonical spec, what the user asked for, its phases, auto's decision."""

    spec: str = "feature-extraction"
    requested: str | None = None
    phases: list[PhaseRecord] = field(default_factory=list)
    auto: dict[str, Any] | None = None  # training.strategies.AutoDecision.to_dict()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "requested": self.requested,
            "phases": [p.to_dict() for p in self.phases],
            "auto": self.auto,
        } | self.extra

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StrategyRecord:
        known = {"spec", "requested", "phases", "auto"}
        return cls(
            spec=d.get("spec", "feature-extraction"),
            requested=d.get("requested"),
            phases=[PhaseRecord.from_dict(p) for p in d.get("phases") or []],
            auto=d.get("auto"),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True, kw_only=True)
class RunMeta:
    """transferkit.json: the backbone, classes and preprocessing a run needs to predict, and what its fit did."""

    modality: str = "image"
    backbone: dict[str, Any]  # BackboneSpec.to_dict(): name, arch, weights, weights_digest
    classes: list[str]
    data_config: dict[str, Any]  # the preprocessing (image: input_size, mean, std, ...; text: max_length, pooling)
    strategy: StrategyRecord = field(default_factory=StrategyRecord)
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig.to_dict()
    feature_cache: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # the data summary: source, skipped files, class counts
    metrics: dict[str, Any] = field(default_factory=dict)  # test metrics with intervals, val accuracy, calibration
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    settings: dict[str, Any] | None = None  # the estimator's settings as given (NOT_RECORDED left out): its parameters on load
    backbone_choice: dict[str, Any] | None = None  # how fit --models chose the backbone
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] | None = None  # the libraries that wrote it (set when saved)
    extra: dict[str, Any] = field(default_factory=dict)

    # the order transferkit.json has always had
    _ORDER = (
        "format_version",
        "modality",
        "backbone",
        "classes",
        "data_config",
        "strategy",
        "training",
        "feature_cache",
        "data",
        "metrics",
        "history",
        "settings",
        "backbone_choice",
        "versions",
    )

    @property
    def test_metrics(self) -> dict[str, Any]:
        """The test split's metrics ({} when the run has none)."""
        return self.metrics.get("test") or {}

    @property
    def backbone_name(self) -> str:
        return self.backbone.get("name") or self.backbone.get("arch", "?")

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.metrics.get("calibration")

    def recorded_settings(self, names: set[str]) -> dict[str, Any]:
        """The estimator parameters among `names` that the run was trained with (`settings`, as given); a run saved
        before they were recorded gets its requested strategy and its training config (defaults resolved)."""
        settings = dict(self.settings or {})
        if "strategy" not in settings:  # an older run recorded only a text run's columns
            settings |= {k: v for k, v in self.training.items() if k in names}
            settings["strategy"] = self.strategy.requested or self.strategy.spec
        if isinstance(settings.get("split"), list):
            settings["split"] = tuple(settings["split"])  # JSON has no tuples
        return {k: v for k, v in settings.items() if k in names}

    def with_(self, **changes: Any) -> RunMeta:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """transferkit.json's content (plain JSON values), in its usual key order; unset optional fields left out."""
        out: dict[str, Any] = {}
        for name in self._ORDER:
            value = getattr(self, name)
            if name in ("settings", "backbone_choice", "versions") and value is None:
                continue
            out[name] = value.to_dict() if isinstance(value, StrategyRecord) else value
        return out | self.extra

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMeta:
        """From transferkit.json's content (checked first by runs.directory.validate_meta when read from disk)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in known}
        values["strategy"] = StrategyRecord.from_dict(d.get("strategy") or {})
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})


def jsonable_setting(value: Any) -> Any:
    """An estimator setting as `settings` holds it: a path as text, a tuple as a list."""
    if isinstance(value, PurePath):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


def _without_none(record: Any) -> dict[str, Any]:
    """A record's fields in declaration order, those that are None (and `extra`) left out."""
    return {f.name: getattr(record, f.name) for f in fields(record) if f.name != "extra" and getattr(record, f.name) is not None}


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
