"""`diagnose(data, model=...)`: the data doctor end to end, from a data source to its findings.

Reads a source as `fit` does (same split for the same seed), makes the
backbone as `fit` makes it, extracts its pooled features for every split
through the feature cache (a fit or compare on the same data has usually paid
for them already) and hands them to `findings.diagnose_features`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from transferkit.data.examples import SPLIT_NAMES, DataSplits
from transferkit.doctor.findings import DEFAULT_FOLDS, Diagnosis, check_settings, diagnose_features
from transferkit.errors import DataError

log = logging.getLogger(__name__)


def diagnose(
    data,
    *,
    model: str | None = None,
    threshold: float | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    split=None,
    cache: bool = True,
    progress: bool = False,
    device: str = "auto",
    precision: str = "auto",
    **data_options,
) -> Diagnosis:
    """Look for label errors, near-duplicates, leakage and outliers in labelled data.

    Args:
        data: what `fit` takes: an image folder, a CSV, ``digits``, a torchvision name, a text
            CSV/TSV/JSONL, or a `DataSplits`.
        model: the backbone whose pooled features are compared (None: the modality's default).
        threshold: input similarity at and above which two examples are near-duplicates: images, the
            Pearson correlation of 16x16 grey thumbnails (None: 0.98); texts, the Jaccard index of
            character 3-grams (None: 0.9). See `transferkit.doctor.near_copies`.
        folds: folds of the out-of-sample probes for the label check (0 skips it).
        seed: the split's seed (as `fit`'s) and the folds' shuffle.
        split: train/val/test fractions when the data gives no split (None: fit's default).
        cache: read and write the feature cache.
        progress: progress bars for the feature extraction.
        data_options: ``image_size`` (images), ``max_length``, ``text_column``, ``label_column`` (texts).

    Returns:
        The Diagnosis.

    Example:
        >>> d = diagnose("digits")                   # doctest: +SKIP
        >>> d.counts()["label"], d.to_rows()[0]["kind"]  # doctest: +SKIP
        (9, 'leakage')
    """
    from transferkit.classifier import CLASSIFIERS, TEXT_ONLY
    from transferkit.data.sources import detect_modality, load_data

    started = time.perf_counter()
    check_settings(threshold=threshold, folds=folds, seed=seed)
    columns = {k: data_options[k] for k in ("text_column", "label_column") if data_options.get(k) is not None}
    given = isinstance(data, DataSplits)
    settings = {"device": device, "precision": precision, "seed": seed, **({"split": split} if split is not None else {})}
    settings |= {k: v for k, v in data_options.items() if v is not None}
    try:
        modality = data.train.modality if given else detect_modality(data, **columns)[0]
    except DataError:  # a bad setting is named before a missing or unreadable DATA, as fit names it
        CLASSIFIERS["text" if set(settings) & set(TEXT_ONLY) else "image"](model, **settings).check_settings()
        raise
    clf = CLASSIFIERS[modality](model, **settings)
    clf.check_settings()  # every setting (the split's fractions too) checked before the data is read
    if given:
        splits, name = data, data.summary.source
    else:
        splits = load_data(data, modality=modality, seed=seed, **({"split": split} if split is not None else {}), **columns)
        name = str(data)
    features, backbone = split_features(clf, splits, cache=cache, progress=progress)
    return diagnose_features(
        splits, features, data_name=name, model_name=backbone, threshold=threshold, folds=folds, seed=seed, started=started
    )


def split_features(clf, splits: DataSplits, *, cache: bool, progress: bool) -> tuple[dict[str, np.ndarray], str]:
    """The pretrained backbone's pooled features of every split (float32), through the feature cache; its name.

    `clf` is an unfitted estimator of the data's modality: its settings (model, image size or
    text length, device, precision) make the backbone as `fit` makes it.
    """
    from transferkit.cache.features import FeatureCache, cached_features
    from transferkit.inference.extraction import resolve_device, resolve_precision

    bb = clf.new_backbone(splits)
    device = resolve_device(clf.device)
    dtype = resolve_precision(clf.precision, device)
    out = {}
    for name in SPLIT_NAMES:
        examples = getattr(splits, name)
        arr, hit = cached_features(
            bb,
            examples,
            cache=FeatureCache.default(enabled=cache),
            device=device,
            dtype=dtype,
            progress=progress,
            label=f"features: {name} ({len(examples)} {bb.noun})",
        )
        log.info("Features of %s %s: %s", name, bb.noun, "from the feature cache" if hit else "computed")
        out[name] = np.asarray(arr, dtype=np.float32)
    return out, bb.spec.name
