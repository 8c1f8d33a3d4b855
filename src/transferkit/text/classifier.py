"""`TextClassifier`: the same verbs, strategies, engine, cache and run directory as images, for texts.

Example:
    >>> clf = TextClassifier("minilm", strategy="finetune:last=2", epochs=3)
    >>> clf.fit("reviews.csv").predict(["great value", "broke in a week"])  # doctest: +SKIP
    ['positive', 'negative']

The run directory of a text model::

    runs/t/
      encoder/            transformers' save_pretrained of the encoder (adapters merged) and its tokenizer
      head.safetensors    the linear head: weight (classes, features), bias (classes)
      adapter/            LoRA runs only: peft's adapter files
      transferkit.json    as for images, with "modality": "text" and data_config {max_length, pooling, ...}

so ``AutoModel.from_pretrained(run / "encoder")``, the pooling named in
transferkit.json and the head reproduce the logits without transferkit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from transferkit import distributed, lora
from transferkit.classifier import ImageClassifier, _Trainer
from transferkit.data import DEFAULT_SPLIT, DataSplits, DataSummary, split_stratified
from transferkit.engine import predict_logits, resolve_device, resolve_precision
from transferkit.errors import RunError, UsageError
from transferkit.features import FeatureCache, cached_features
from transferkit.runs import read_meta, save_run
from transferkit.text.backbone import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEXT_BACKBONE,
    TextBackbone,
    TextModel,
    load_text_backbone,
    tokenize,
)
from transferkit.text.data import LABEL_COLUMN, TEXT_COLUMN, TextSet, load_eval_texts, load_text_data
from transferkit.tracking import Tracker

ENCODER_DIR, HEAD_FILE = "encoder", "head.safetensors"


class _Tokenize:
    """DataLoader collate: (text, label, index) items to (tokens (B, 2, T), labels, indices)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items):
        texts, labels, idx = zip(*items)
        return tokenize(self.tokenizer, list(texts), self.max_length), torch.tensor(labels), torch.tensor(idx)


def text_loader(texts: TextSet, tokenizer, max_length: int, batch_size: int, *, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    items = [(t, int(y), i) for i, (t, y) in enumerate(zip(texts.texts, texts.labels))]
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       generator=torch.Generator().manual_seed(seed),
                                       collate_fn=_Tokenize(tokenizer, max_length))


def cached_text_features(bb: TextBackbone, texts: TextSet, *, cache: FeatureCache, device: torch.device,
                         dtype: torch.dtype | None, batch_size: int = 64, progress: bool = True,
                         label: str = "features") -> tuple[np.ndarray, bool]:
    """Pooled embeddings of `texts` through the feature cache (keyed by model, weights, tokenizer, max length,
    pooling, precision and the texts' content); returns (array, came from the cache)."""
    return cached_features(bb, texts, _as_is, bb.data_config, cache=cache, device=device, dtype=dtype,
                           batch_size=batch_size, workers=0, progress=progress, label=label,
                           collate=_Tokenize(bb.tokenizer, bb.data_config["max_length"]))


def _as_is(text: str) -> str:
    """The per-item transform of texts: none (the tokenizer works on whole batches, in `_Tokenize`)."""
    return text


class _TextTrainer(_Trainer):
    """The image trainer with text's two data steps: embeddings from the text cache, batches of token ids."""

    def _cached(self, split: str, cut=None) -> tuple[np.ndarray, str]:
        texts = getattr(self.splits, split)
        arr, hit = cached_text_features(self.bb, texts, cache=self.cache, device=self.device, dtype=self.dtype,
                                        progress=self.progress, label=f"{split} ({len(texts)} texts)")
        return arr, "hit" if hit else ("miss" if self.cache.enabled else "off")

    def _prefix_split(self, phase, top_blocks: int) -> str:
        return "frozen-prefix caching covers image backbones (torch.fx graphs); text layers train on tokens"

    def _image_loader(self, split: str, train: bool):
        """Batches of (tokens, labels, indices): the loader every training and evaluation phase reads."""
        texts = getattr(self.splits, split)
        return text_loader(texts, self.bb.tokenizer, self.data_config["max_length"], self.cfg.batch_size, shuffle=train,
                           seed=self.cfg.seed, drop_last=train and len(texts) > self.cfg.batch_size)


class TextClassifier(ImageClassifier):
    """Adapt a pretrained text encoder (Hugging Face transformers) to labelled texts.

    Args:
        model: ``minilm`` (built-in, offline), a hub name (``bert-base-uncased``) or a save_pretrained folder.
        strategy: ``feature-extraction``, ``finetune:last=N`` (the top N transformer layers), ``finetune:all``,
            ``lp-ft``, ``gradual``, ``lora`` or ``auto``.
        weights: None for the pretrained weights, ``"none"`` for random initialisation (a from-scratch baseline).
        max_length: tokens per text; longer texts are truncated.
        pooling: ``auto`` (the model's own: mean for sentence-transformers models, else [CLS]), ``mean`` or ``cls``.
        text_column, label_column: the columns of a CSV/TSV/JSONL data file.
        Other keyword arguments are those of :class:`~transferkit.ImageClassifier` (split, strict, cache,
        checkpoint_dir, resume, progress, tracker) and :class:`transferkit.engine.TrainConfig` fields.
    """

    noun = "texts"

    def __init__(self, model: str = DEFAULT_TEXT_BACKBONE, *, strategy: str = "auto", weights: str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, pooling: str = "auto", text_column: str = TEXT_COLUMN,
                 label_column: str = LABEL_COLUMN, split: Sequence[float] = DEFAULT_SPLIT, strict: bool = False,
                 cache: bool = True, checkpoint_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True, tracker: Tracker | None = None, **train):
        super().__init__(model, strategy=strategy, weights=weights, split=split, strict=strict, cache=cache,
                         checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, tracker=tracker, **train)
        self.max_length = max_length
        self.pooling = pooling
        self.text_column = text_column
        self.label_column = label_column

    # ------------------------------------------------------------------ fit

    def fit(self, X, y: Sequence | None = None) -> TextClassifier:
        """Train on a CSV/TSV/JSONL file, (texts, labels), or a DataSplits of TextSets."""
        if distributed.launched():
            raise UsageError("Text models train in one process: their loaders are not sharded across torchrun's "
                             "processes yet. Run `transferkit fit` without torchrun (--nproc_per_node 1).")
        super().fit(X, y)
        self.tokenizer_ = self.backbone_.tokenizer
        return self

    @property
    def _trainer_class(self) -> type[_Trainer]:
        return _TextTrainer

    def _load_backbone(self, n_classes: int) -> TextBackbone:
        return load_text_backbone(self.model, n_classes, weights=self.weights, pooling=self.pooling,
                                  max_length=self.max_length)

    def _fingerprint(self, strategy, cfg, splits) -> dict:
        return super()._fingerprint(strategy, cfg, splits) | {"max_length": self.max_length, "pooling": self.pooling}

    def _splits(self, X, y, seed: int) -> DataSplits:
        if isinstance(X, DataSplits):
            return X
        if y is not None:
            texts = _text_set(X, [str(v) for v in y], sorted({str(v) for v in y}))
            return DataSplits(*split_stratified(texts, self.split, seed, "the given texts"), DataSummary("texts"))
        return load_text_data(X, text_column=self.text_column, label_column=self.label_column, split=self.split,
                              seed=seed, strict=self.strict)

    # ------------------------------------------------------------------ predict

    def decision_function(self, X: Sequence[str] | TextSet, batch_size: int = 64) -> np.ndarray:
        """Raw logits, one row per text."""
        self._check_fitted()
        texts = X if isinstance(X, TextSet) else _text_set(X, None, self.classes_)
        device = resolve_device(self._predict_setting("device"))
        dtype = resolve_precision(self._predict_setting("precision"), device)
        loader = text_loader(texts, self.tokenizer_, self.data_config_["max_length"], batch_size)
        logits, _ = predict_logits(self.model_.to(device), loader, device, dtype)
        return logits

    def score(self, X, y: Sequence | None = None) -> float:
        """Accuracy on a labelled text file, a TextSet, or (texts, labels)."""
        self._check_fitted()
        if y is not None:
            texts = _text_set(X, [str(v) for v in y], self.classes_)
        elif isinstance(X, TextSet):
            texts = X
        else:
            texts, _ = load_eval_texts(X, self.classes_, text_column=self.text_column, label_column=self.label_column)
        return float((self.decision_function(texts).argmax(1) == texts.labels).mean())

    # ------------------------------------------------------------------ persistence

    def _run_meta(self) -> dict:
        return super()._run_meta() | {"modality": "text",
                                      "text": {"text_column": self.text_column, "label_column": self.label_column}}

    def _write_run(self, out: Path, meta: dict) -> None:
        save_run(out, self.model_, meta, getattr(self, "history_", None),
                 write_model=lambda folder, model: write_text_model(folder, model, self.tokenizer_))

    @classmethod
    def load(cls, path: str | Path, **settings) -> TextClassifier:
        """Load a text run directory written by `save` (or `transferkit fit`)."""
        meta = read_meta(Path(path))
        if meta.get("modality") != "text":
            raise RunError(f"{path} holds an image model; load it with ImageClassifier.load (or predict image files).")
        model, tokenizer = read_text_model(Path(path), meta)
        columns = meta.get("text", {})
        settings = {"text_column": columns.get("text_column", TEXT_COLUMN),
                    "label_column": columns.get("label_column", LABEL_COLUMN), **settings}
        clf = cls._restore(model, meta, settings)
        clf.tokenizer_ = tokenizer
        clf.max_length, clf.pooling = meta["data_config"]["max_length"], meta["data_config"]["pooling"]
        return clf


def _text_set(texts, labels: list[str] | None, classes: list[str]) -> TextSet:
    if isinstance(texts, str | Path):
        raise UsageError(f"Pass a list of texts, not one {type(texts).__name__} ({str(texts)[:60]!r}): "
                         "predict([text]) for one text, score(FILE) for a labelled file.")
    texts = [str(t) for t in texts]
    if labels is not None and len(labels) != len(texts):
        raise UsageError(f"got {len(texts)} texts and {len(labels)} labels; they must pair up one to one.")
    unknown = sorted({v for v in labels or []} - set(classes))
    if unknown:
        raise UsageError(f"labels {unknown[:5]} are not classes of this model ({', '.join(classes)}).")
    index = {c: i for i, c in enumerate(classes)}
    return TextSet(texts, [index[v] for v in labels] if labels is not None else [0] * len(texts), classes, "texts")


def write_text_model(out: Path, model: torch.nn.Module, tokenizer) -> None:
    """encoder/ with save_pretrained (adapters merged; peft's adapter/ beside it) and head.safetensors."""
    from safetensors.torch import save

    from transferkit.runs import write_atomic

    if lora.is_adapted(model):
        lora.save_adapters(model, out / lora.ADAPTER_DIR)
        model = lora.merged_copy(model)
    model.encoder.save_pretrained(str(out / ENCODER_DIR))
    tokenizer.save_pretrained(str(out / ENCODER_DIR))
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    write_atomic(out / HEAD_FILE, save(head, metadata={"format": "pt", "pooling": model.pooling}))


def read_text_model(run_dir: Path, meta: dict) -> tuple[TextModel, object]:
    """The TextModel and tokenizer of a text run directory (transformers' own loaders, no download)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    try:
        encoder = AutoModel.from_pretrained(str(run_dir / ENCODER_DIR))
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir / ENCODER_DIR))
        model = TextModel(encoder.float(), len(meta["classes"]), meta["data_config"]["pooling"])
        model.head.load_state_dict(load_file(str(run_dir / HEAD_FILE)), strict=True)
    except Exception as e:  # OSError, SafetensorError, RuntimeError on a shape mismatch
        raise RunError(f"Cannot load the text model in {run_dir}: {str(e)[:300]}. The run directory is damaged; "
                       "fit again.") from e
    return model.eval(), tokenizer

