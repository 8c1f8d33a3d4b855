"""The estimators: `ImageClassifier` and `TextClassifier`, the library's verbs in scikit-learn's shape.

The constructor only stores settings (keyword arguments; None means the
library default); `fit` validates every setting before reading any data,
trains and returns self; fitted state ends in `_`; `predict` before `fit` says
so. Both classes share one base and differ only in the settings they accept
and in how their inputs become examples. `load_classifier(run)` returns the
right one for a run directory.

Example:
    >>> clf = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction")
    >>> clf.fit("digits").score("digits")      # doctest: +SKIP
    0.96
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from sklearn.base import BaseEstimator

from transferkit.data.examples import DEFAULT_SPLIT
from transferkit.errors import NotFittedError, UsageError, check_choice, did_you_mean
from transferkit.runs.meta import jsonable_setting
from transferkit.training.strategies import BN_POLICIES, parse_strategy

if TYPE_CHECKING:
    from transferkit.runs.meta import RunMeta

# Settings only one modality has: given to the other classifier they are refused with the reason.
IMAGE_ONLY = ("image_size", "bn", "augment", "cache_budget_gb")
TEXT_ONLY = ("max_length", "pooling", "text_column", "label_column")
# Where a fit runs, not what it trains (as a checkpoint's fingerprint): not recorded, so a loaded estimator takes defaults.
NOT_RECORDED = ("tracker", "checkpoint_dir", "resume", "progress", "device", "workers")
FITTED = (
    "backbone_",
    "model_",
    "classes_",
    "data_config_",
    "strategy_",
    "decision_",
    "config_",
    "phases_",
    "history_",
    "metrics_",
    "data_summary_",
    "feature_cache_",
    "backbone_choice_",
    "report_extras_",
)


class Classifier(BaseEstimator):
    """What both estimators share: settings, fit, predict, score, save and load (see the module doc)."""

    modality: ClassVar[str]
    _other_only: ClassVar[tuple[str, ...]]

    def _store(self, params: dict) -> None:
        """The constructor's work: keep every parameter as given; refuse unknown names now, with a suggestion."""
        unknown = params.pop("unknown", {})
        for name, value in params.items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)
        if unknown:
            name = next(iter(unknown))
            if name in self._other_only:
                raise UsageError(
                    f"{name} only applies to {'texts' if self.modality == 'image' else 'images'}; "
                    f"{type(self).__name__} does not take it. Leave it out."
                )
            raise UsageError(
                f"{type(self).__name__} got an unknown setting '{name}'."
                f"{did_you_mean(name, self._get_param_names())} Valid: {', '.join(self._get_param_names())}."
            )

    # ------------------------------------------------------------------ fit

    def fit(self, X, y: Sequence | None = None, *, backbone_choice: dict | None = None):
        """Train on a data source (folder, CSV, ``digits``, dataset name, text file), (inputs, labels), or a DataSplits;
        `backbone_choice` (how ``fit --models`` chose the backbone) is kept in the run's record."""
        from transferkit.report.doctor import fit_extras
        from transferkit.training.fit import FitRequest, fit

        cfg, strategy = self.check_settings()
        request = FitRequest(
            lambda seed: self._splits(X, y, seed),
            self.new_backbone,
            strategy,
            bn=getattr(self, "bn", BN_POLICIES[0]),
            cache=self.cache,
            cache_budget_gb=self._cache_budget(),
            progress=self.progress,
            checkpoint_dir=self.checkpoint_dir,
            resume=self.resume,
            tracker=self.tracker,
            tracked=self._tracked(),
        )
        self._set_fitted(fit(request, cfg))
        self.backbone_choice_ = backbone_choice
        # the report's gallery and doctor, rendered now so that the fitted estimator does not keep the examples
        inputs, self._fitted.report_inputs = self._fitted.report_inputs, None
        self.report_extras_ = fit_extras(inputs) if inputs else None
        return self

    def _set_fitted(self, fitted) -> None:
        """The fitted attributes (names end in `_`) of a fit or of a loaded run."""
        self._fitted = fitted
        for name, value in fitted.attributes().items():
            setattr(self, name, value)

    def check_settings(self):
        """Every setting checked before any data is read (a UsageError names the bad one); -> (TrainConfig, Strategy)."""
        from transferkit.backbones import check_backbone
        from transferkit.data.splits import validate_split
        from transferkit.training.config import TrainConfig

        cfg = TrainConfig.from_settings({k: getattr(self, k, None) for k in TrainConfig.names()}, type(self).__name__)
        strategy = parse_strategy(self.strategy)
        if self.resume and self.checkpoint_dir is None:
            raise UsageError("resume=True needs checkpoint_dir (the CLI uses OUT/checkpoints).")
        validate_split(self.split)
        self._validate_modality_settings()
        check_backbone(self.model, self.modality, weights=self.weights, lora=strategy.kind == "lora")
        return cfg, strategy

    def _tracked(self) -> dict:
        """This estimator's own settings for the experiment tracker (training settings come from the config)."""
        from transferkit.backbones import DEFAULT_BACKBONES
        from transferkit.training.config import TrainConfig

        names = [k for k in self._get_param_names() if k != "tracker" and k not in TrainConfig.names()]
        own = {k: v if isinstance(v, int | float | bool | type(None)) else str(v) for k, v in ((k, getattr(self, k)) for k in names)}
        return own | {"model": self.model or DEFAULT_BACKBONES[self.modality], "strategy_requested": own.pop("strategy")}

    # ------------------------------------------------------------------ predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet: call fit(...) or {type(self).__name__}.load(run_dir).")

    def decision_function(self, X, batch_size: int = 64):
        """Raw logits, one row per input (columns follow `classes_`)."""
        from transferkit.inference.extraction import predict_examples

        self._check_fitted()
        return predict_examples(
            self.backbone_,
            self._as_examples(X),
            len(self.classes_),
            batch_size=batch_size,
            device=self.device,
            precision=self.precision,
            engine=self.engine or self.config_.engine,
        )

    def predict_proba(self, X, batch_size: int = 64):
        """Class probabilities, one row per input (columns follow `classes_`)."""
        from scipy.special import softmax

        return softmax(self.decision_function(X, batch_size), axis=1)

    def predict(self, X) -> list[str]:
        """Predicted class names, one per input."""
        return [self.classes_[i] for i in self.decision_function(X).argmax(1)]

    def score(self, X, y: Sequence | None = None) -> float:
        """Accuracy on a labelled data source (all of it), labelled examples, or (inputs, labels)."""
        self._check_fitted()
        examples = self._labelled(X, y)
        return float((self.decision_function(examples).argmax(1) == examples.labels).mean())

    def _labelled(self, X, y):
        from transferkit.data.examples import Examples
        from transferkit.data.sources import load_eval

        if isinstance(X, Examples):
            return X
        if y is None:
            return load_eval(X, self.classes_, modality=self.modality, strict=self.strict, **self._eval_columns())[0]
        return self._as_examples(X, [str(v) for v in y])

    def _eval_columns(self) -> dict:
        return {}

    def _run_settings(self) -> dict:
        """transferkit.json's `settings`: this estimator's as given, so a loaded one has the parameters it was trained with."""
        return {k: jsonable_setting(getattr(self, k)) for k in self._get_param_names() if k not in NOT_RECORDED}

    # ------------------------------------------------------------------ persistence

    def run_meta(self) -> RunMeta:
        """The record of this fitted classifier that transferkit.json holds."""
        self._check_fitted()
        choice = getattr(self, "backbone_choice_", None) or None
        return self._fitted.to_meta(self.strategy).with_(settings=self._run_settings(), backbone_choice=choice)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write a run directory (model, transferkit.json, metrics, history, report); under torchrun rank 0 only. A finished
        run in `path` is replaced only with `overwrite=True` (fit's --overwrite; else a UsageError); other files stay."""
        from transferkit import distributed
        from transferkit.runs.directory import save_run

        self._check_fitted()
        if distributed.is_main():
            extras = getattr(self, "report_extras_", None)
            save_run(Path(path), self.backbone_, self.run_meta(), report_extras=extras, overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, **settings):
        """A fitted classifier from a run directory written by `save` (or `transferkit fit`), with the parameters it was
        trained with (not where it ran: NOT_RECORDED): ``sklearn.base.clone(loaded).fit(X)`` trains the same again."""
        from transferkit.runs.directory import load_run
        from transferkit.training.fit import Fitted

        run = load_run(path, expect=cls.modality)
        recorded = run.meta.recorded_settings(set(cls._get_param_names()) - set(NOT_RECORDED))
        clf = cls(**{**recorded, "model": run.meta.backbone.get("name"), **settings})
        clf._set_fitted(Fitted.from_meta(run.backbone, run.meta))
        clf.backbone_choice_, clf.report_extras_ = run.meta.backbone_choice, None  # a saved run's report is on disk
        clf.meta_ = run.meta
        return clf

    # Each estimator names its modality and supplies: _validate_modality_settings(), _cache_budget(),
    # _splits(X, y, seed) -> DataSplits, new_backbone(splits) -> Backbone, _as_examples(X, labels) -> Examples.

    def _cache_budget(self) -> float:
        return 0.0


def load_classifier(run: str | Path, **settings) -> Classifier:
    """The fitted ImageClassifier or TextClassifier of a run directory, by the modality it records."""
    from transferkit.runs.directory import run_modality

    return CLASSIFIERS[run_modality(run)].load(run, **settings)


class ImageClassifier(Classifier):
    """Adapt a pretrained image backbone to labelled images.

    Args:
        model: a built-in (``builtin:efficientnet_lite0``, the default, ``_lite1``, ``_lite2``) or a timm name (``timm:NAME``).
        strategy: ``feature-extraction``, ``finetune:last=N``, ``finetune:all``, ``lp-ft``, ``gradual``,
            ``lora`` (transformers such as ``vit_*``) or ``auto``.
        weights: a local .safetensors/.pth file, ``"none"`` for random init, or None for the default source.
        image_size: input size in pixels; None takes the backbone's (or a built-in dataset's) default.
        bn: BatchNorm policy while fine-tuning: ``all-frozen`` (every BN layer normalises with its stored
            statistics in training as in evaluation; its scale and shift still train) or ``frozen-blocks``
            (trainable blocks use batch statistics and update them). all-frozen because on the digits demo
            frozen-blocks fell from 96.7% (probe) to 73% val accuracy in 3 epochs: timm's TF-ported BN
            updates its running statistics with momentum 0.01, so they lag the batch statistics.
        augment: ``none`` (default), ``light`` or ``strong`` (timm's training transforms, train split only).
        split: train/val/test fractions when the data gives no split.
        strict: unreadable files are an error instead of skipped and counted.
        cache: use the on-disk feature cache.
        engine: frozen passes (extraction, predict): ``auto`` (the default, or $TRANSFERKIT_ENGINE: OpenVINO on a CPU
            if installed), ``torch``, ``openvino``.
        cache_budget_gb: most disk (GB) the frozen blocks' outputs and the images decoded once may take
            (default 10; 0 turns both off; a larger cache is refused with a message and training decodes images).
        checkpoint_dir: where to write a checkpoint after every epoch (None: no checkpoints).
        resume: continue from the checkpoint in `checkpoint_dir` (same data, strategy and settings).
        progress: show progress bars on stderr (messages go through :mod:`logging`).
        tracker: an open experiment-tracking run (:func:`transferkit.tracking.open_run`), or None.
        The remaining keywords are :class:`transferkit.training.config.TrainConfig` fields; None takes its default.
    """

    modality, _other_only = "image", TEXT_ONLY

    def __init__(
        self,
        model: str | None = None,
        *,
        strategy: str = "auto",
        weights: str | Path | None = None,
        image_size: int | None = None,
        bn: str = BN_POLICIES[0],
        augment: str | None = None,
        split: Sequence[float] = DEFAULT_SPLIT,
        strict: bool = False,
        cache: bool = True,
        cache_budget_gb: float | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = False,
        tracker=None,
        epochs: int | None = None,
        head_epochs: int | None = None,
        lr: float | None = None,
        backbone_lr_scale: float | None = None,
        layer_decay: float | None = None,
        weight_decay: float | None = None,
        optimizer: str | None = None,
        class_weights: str | None = None,
        batch_size: int | None = None,
        label_smoothing: float | None = None,
        grad_clip: float | None = None,
        accumulate: int | None = None,
        patience: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        precision: str | None = None,
        workers: int | None = None,
        engine: str | None = None,
        **unknown,
    ):
        self._store(locals())

    def _validate_modality_settings(self) -> None:
        check_choice("bn", self.bn, BN_POLICIES)
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 16):
            raise UsageError(f"image_size must be an integer of at least 16 pixels; got {self.image_size!r}.")
        if self.cache_budget_gb is not None and not self.cache_budget_gb >= 0:
            raise UsageError(f"cache_budget_gb must be >= 0 (0 turns frozen-prefix caching off); got {self.cache_budget_gb!r}.")

    def _cache_budget(self) -> float:
        from transferkit.training.config import DEFAULT_CACHE_BUDGET_GB

        return DEFAULT_CACHE_BUDGET_GB if self.cache_budget_gb is None else float(self.cache_budget_gb)

    def _splits(self, X, y, seed: int):
        from transferkit.data import DataSplits, DataSummary, load_image_data, read_paths, split_stratified

        if isinstance(X, DataSplits):
            return X
        if y is None:
            return load_image_data(X, split=self.split, seed=seed, strict=self.strict)
        summary = DataSummary("paths")
        images = read_paths(list(X), list(y), summary, self.strict)
        train, val, test = split_stratified(images, self.split, seed, "the given paths")
        return DataSplits(train, val, test, summary)

    def new_backbone(self, splits):
        from transferkit.backbones import ImageBackbone, load_backbone

        bb = load_backbone(self.model, len(splits.classes), modality="image", weights=self.weights)
        assert isinstance(bb, ImageBackbone)  # modality="image"
        bb.configure_input(self.image_size, splits.train.preprocess_hint)
        return bb

    def _as_examples(self, X, labels: list[str] | None = None):
        from transferkit.data.images import as_image_set

        return as_image_set(X, self.classes_, labels)


class TextClassifier(Classifier):
    """Adapt a pretrained text encoder (Hugging Face transformers) to labelled texts.

    Args:
        model: ``minilm`` (built-in, offline; the default), a hub name (``bert-base-uncased``) or a
            save_pretrained folder.
        strategy: ``feature-extraction``, ``finetune:last=N`` (the top N transformer layers), ``finetune:all``,
            ``lp-ft``, ``gradual``, ``lora`` or ``auto``.
        weights: None for the pretrained weights, ``"none"`` for random initialisation (a from-scratch baseline).
        max_length: tokens per text (default 128); longer texts are truncated.
        pooling: ``auto`` (the model's own: mean for sentence-transformers models, else [CLS]), ``mean`` or ``cls``.
        text_column, label_column: the columns of a CSV/TSV/JSONL data file (default ``text``, ``label``).
        The other keywords are those of :class:`ImageClassifier` that are not about images.

    Example:
        >>> clf = TextClassifier("minilm", strategy="finetune:last=2", epochs=3)
        >>> clf.fit("reviews.csv").predict(["great value", "broke in a week"])  # doctest: +SKIP
        ['positive', 'negative']
    """

    modality, _other_only = "text", IMAGE_ONLY

    def __init__(
        self,
        model: str | None = None,
        *,
        strategy: str = "auto",
        weights: str | None = None,
        max_length: int | None = None,
        pooling: str = "auto",
        text_column: str | None = None,
        label_column: str | None = None,
        split: Sequence[float] = DEFAULT_SPLIT,
        strict: bool = False,
        cache: bool = True,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = False,
        tracker=None,
        epochs: int | None = None,
        head_epochs: int | None = None,
        lr: float | None = None,
        backbone_lr_scale: float | None = None,
        layer_decay: float | None = None,
        weight_decay: float | None = None,
        optimizer: str | None = None,
        class_weights: str | None = None,
        batch_size: int | None = None,
        label_smoothing: float | None = None,
        grad_clip: float | None = None,
        accumulate: int | None = None,
        patience: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        precision: str | None = None,
        workers: int | None = None,
        engine: str | None = None,
        **unknown,
    ):
        self._store(locals())

    def _validate_modality_settings(self) -> None:
        from transferkit.backbones.text import POOLINGS

        check_choice("pooling", self.pooling, POOLINGS)
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise UsageError(f"max_length must be an integer of at least 2 tokens; got {self.max_length!r}.")

    def _columns(self) -> dict:
        return {k: v for k, v in (("text_column", self.text_column), ("label_column", self.label_column)) if v}

    def _eval_columns(self) -> dict:
        return self._columns()

    def _splits(self, X, y, seed: int):
        from transferkit.data import DataSplits, DataSummary, load_text_data, split_stratified
        from transferkit.data.texts import as_text_set

        if isinstance(X, DataSplits):
            return X
        if y is None:
            return load_text_data(X, split=self.split, seed=seed, strict=self.strict, **self._columns())
        texts = as_text_set(X, sorted({str(v) for v in y}), [str(v) for v in y])
        train, val, test = split_stratified(texts, self.split, seed, "the given texts")
        return DataSplits(train, val, test, DataSummary("texts"))

    def new_backbone(self, splits):
        from transferkit.backbones import load_backbone

        options = {"pooling": self.pooling} | ({"max_length": self.max_length} if self.max_length else {})
        return load_backbone(self.model, len(splits.classes), modality="text", weights=self.weights, **options)

    def _as_examples(self, X, labels: list[str] | None = None):
        from transferkit.data.texts import as_text_set

        return as_text_set(X, self.classes_, labels)


CLASSIFIERS: dict[str, type[Classifier]] = {"image": ImageClassifier, "text": TextClassifier}
