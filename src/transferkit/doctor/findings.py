"""The data doctor's findings on features at hand: label errors, leakage, duplicates, outliers, as data.

`diagnose_features(splits, features)` runs the checks of :mod:`~transferkit.doctor.label_issues`,
:mod:`~transferkit.doctor.pairs` and :mod:`~transferkit.doctor.outliers` on one (n, d) feature array per
split and returns a `Diagnosis`:

* likely label errors among train + val: out-of-sample class probabilities for
  every example, each from probes that never saw it (stratified k-fold), then
  confident learning (`label_issues.find_label_issues`);
* near-copies, found in input space (`near_copies`: image thumbnails, text 3-grams), across splits
  (leakage: train/val, train/test, val/test) and within a split (a conflict under different labels,
  or a plain duplicate);
* outliers: examples far from every neighbour of their own class;
* byte-identical files across splits, as the data scanner already reports them.

`transferkit.doctor.diagnose.diagnose` gets the features (data -> backbone -> feature
cache) and calls it; the fit and compare reports call it on the features their
fit already cached.

The out-of-sample probabilities average two probes fitted on the same folds:
the standardised L2 logistic regression of `crossval.cross_validated_probe`
and a cosine, distance-weighted k-nearest-neighbour vote. The two make
different mistakes (a linear boundary against local neighbourhoods), so their
mean is wrong with confidence less often, and confident learning then counts
fewer of the probe's own errors as label noise. On digits with 5% of the
training labels flipped (one seeded draw, fp32 features, 10 folds) the
logistic probe alone flagged with precision 0.59 and recall 0.90, the k-NN
vote alone 0.60 and 0.81, their average 0.83 and 0.87 (AUROC 0.993 -> 0.996);
README's table (benchmarks/doctor_label_flips.py) has the 5-fold default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from transferkit.data.examples import SPLIT_NAMES, DataSplits
from transferkit.doctor.label_issues import find_label_issues
from transferkit.doctor.near_copies import MATCH_THRESHOLD, MEASURES, default_threshold, find_copies
from transferkit.doctor.outliers import outliers
from transferkit.doctor.pairs import SimilarPair, classify_pairs
from transferkit.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
KNN_NEIGHBOURS = 10  # neighbours of the k-NN probe; distance-weighted, so the nearest count most
# Near-duplicates are searched in input space (transferkit.doctor.near_copies: images by the Pearson correlation of
# 16x16 grey thumbnails, texts by the Jaccard index of character 3-grams), not by feature cosine: centred
# backbone features could not separate copies from look-alikes. A centred cosine of 0.8 paired 5,579 digits
# (2,686 of them "leaked" across splits, most of the test split), while re-encoded copies of generated
# pictures fell to 0.56 (JPEG 95 -> 85, 128 -> 124 px) and heavily re-compressed ones to 0.14 (JPEG 20).
# The threshold is the modality's near_copies.MATCH_THRESHOLD unless given; each pair's centred feature
# cosine is reported beside its input similarity.
# What each kind of finding means, most serious first (reports and the terminal table use this order).
KINDS = {
    "leakage": "near-duplicates across splits: an evaluation example the model has, in effect, trained on",
    "identical-file": "val/test files byte-identical to a file in an earlier split (found by the data scanner)",
    "label": "likely label errors: out-of-sample probabilities contradict the given label (confident learning)",
    "conflict": "near-duplicates in one split under different labels",
    "duplicate": "near-duplicates in one split under the same label",
    "outlier": "far from every example of its own class",
}
CSV_COLUMNS = ("kind", "split", "id", "given_label", "suggested_label", "score", "cosine", "other_split", "other_id", "other_label")


@dataclass(frozen=True)
class Finding:
    """One finding: an example (and, for a pair, the other example) and what is suspected.

    Attributes:
        kind: one of `KINDS`.
        split, index, id: where the example is: its split, its position there, its path or text id.
        given_label: the example's label as given.
        suggested_label: for "label", the probes' top class; None otherwise.
        score: "label": 1 - the out-of-sample probability of the given label (higher = surer);
            pairs: their input similarity (`near_copies`: thumbnail correlation, text 3-gram
            Jaccard); "outlier": the mean cosine distance to its nearest same-class neighbours;
            "identical-file": 1.0.
        other_split, other_index, other_id, other_label: the second example of a pair, else None.
        cosine: for a pair, the cosine similarity of the two centred backbone features (reported, does not decide).
    """

    kind: str
    split: str
    index: int
    id: str
    given_label: str
    suggested_label: str | None
    score: float
    other_split: str | None = None
    other_index: int | None = None
    other_id: str | None = None
    other_label: str | None = None
    cosine: float | None = None

    def row(self) -> dict:
        """The finding as one issues.csv row (CSV_COLUMNS; empty strings for what does not apply)."""
        values = {k: getattr(self, k) for k in CSV_COLUMNS}
        values["score"] = f"{self.score:.4f}"
        values["cosine"] = None if self.cosine is None else f"{self.cosine:.4f}"
        return {k: "" if v is None else v for k, v in values.items()}


@dataclass(frozen=True, eq=False)
class Diagnosis:
    """What the data doctor found, as data: `findings` in report order, and how it looked.

    Attributes:
        data, model, modality: what was diagnosed, with which backbone.
        classes: the class names; sizes: examples per split.
        findings: every Finding, by kind (KINDS order), most certain first within a kind.
        threshold: the input similarity (`near_copies.MEASURES[modality]`) at and above which a pair
            is a near-duplicate.
        folds: folds of the out-of-sample probes (0: the label check did not run, see notes).
        probe_accuracy: accuracy of the averaged out-of-fold probabilities on train + val.
        estimated_label_errors: off-diagonal share of confident learning's joint: the estimated
            fraction of train + val examples whose given label is wrong.
        notes: what was skipped and why.
        seconds: wall time of the whole diagnosis.
        label_scores: {"train": (n,), "val": (n,)} 1 - the out-of-sample probability of each
            example's given label (what ranks the label findings), when the label check ran.
        splits: the examples themselves (for thumbnails); not part of the data view.
    """

    data: str
    model: str
    modality: str
    classes: tuple[str, ...]
    sizes: dict
    findings: tuple[Finding, ...]
    threshold: float
    folds: int
    probe_accuracy: float | None
    estimated_label_errors: float | None
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    label_scores: dict = field(default_factory=dict, repr=False)
    splits: DataSplits | None = field(default=None, repr=False)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def counts(self) -> dict[str, int]:
        """Findings per kind, every kind listed (0 included), in KINDS order."""
        return {k: len(self.of_kind(k)) for k in KINDS}

    def to_rows(self) -> list[dict]:
        """Every finding as an issues.csv row (CSV_COLUMNS)."""
        return [f.row() for f in self.findings]

    def summary_line(self) -> str:
        """One sentence: the counts, for reports and logs."""
        counts = {k: n for k, n in self.counts().items() if n}
        if not counts:
            return f"No findings on {sum(self.sizes.values())} {self.noun}s (near-duplicate threshold {self.threshold:g})."
        parts = ", ".join(f"{n} {_kind_word(k, n)}" for k, n in counts.items())
        return f"{parts} among {sum(self.sizes.values())} {self.noun}s (near-duplicate threshold {self.threshold:g})."

    @property
    def measure(self) -> str:
        """What the near-duplicate threshold is a threshold on, in words."""
        return MEASURES.get(self.modality, MEASURES["image"])

    @property
    def noun(self) -> str:
        return "text" if self.modality == "text" else "image"

    def to_dict(self) -> dict:
        """JSON-ready: settings, counts and every finding."""
        return {
            "data": self.data,
            "model": self.model,
            "modality": self.modality,
            "classes": list(self.classes),
            "sizes": self.sizes,
            "threshold": self.threshold,
            "measure": self.measure,
            "folds": self.folds,
            "probe_accuracy": self.probe_accuracy,
            "estimated_label_errors": self.estimated_label_errors,
            "counts": self.counts(),
            "notes": list(self.notes),
            "seconds": self.seconds,
            "findings": [f.row() | {"index": f.index, "other_index": f.other_index} for f in self.findings],
        }


def _kind_word(kind: str, n: int) -> str:
    words = {
        "leakage": "leaked pair",
        "identical-file": "identical file",
        "label": "likely label error",
        "conflict": "conflicting pair",
        "duplicate": "duplicate pair",
        "outlier": "outlier",
    }
    return words[kind] + ("s" if n != 1 else "")


def check_settings(*, threshold: float | None, folds: int, seed: int) -> None:
    """Refuse bad doctor settings before any data is read (threshold None: the modality's default)."""
    bad = isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1
    if threshold is not None and bad:
        raise UsageError(
            f"--threshold (threshold) must be an input similarity in (0, 1]; got {threshold!r}. "
            f"It is the {MEASURES['image']} for images ({MATCH_THRESHOLD['image']} if not given) "
            f"and the {MEASURES['text']} for texts ({MATCH_THRESHOLD['text']})."
        )
    if isinstance(folds, bool) or not isinstance(folds, int) or folds == 1 or folds < 0:
        raise UsageError(f"--folds (folds) must be 0 (no label check) or at least 2; got {folds!r}. {DEFAULT_FOLDS} is the usual choice.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"--seed (seed) must be an integer; got {seed!r}.")


def diagnose_features(
    splits: DataSplits,
    features: Mapping[str, np.ndarray],
    *,
    data_name: str,
    model_name: str,
    threshold: float | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    started: float | None = None,
) -> Diagnosis:
    """The checks on features already at hand (one (n, d) array per split): what `diagnose` and the reports run.

    `threshold` is the input similarity of near-duplicates (None: `near_copies.MATCH_THRESHOLD` of the
    modality); the examples are loaded once each for it (images to thumbnails).
    """
    started = time.perf_counter() if started is None else started
    check_settings(threshold=threshold, folds=folds, seed=seed)
    threshold = default_threshold(splits.train.modality) if threshold is None else threshold
    ids = {s: getattr(splits, s).ids() for s in SPLIT_NAMES}
    notes: list[str] = []
    labels, accuracy, noise, used, scores = _label_findings(splits, features, ids, folds, seed, notes)
    findings = (
        _pair_findings(splits, features, ids, threshold) + _identical_files(splits, ids) + labels + _outlier_findings(splits, features, ids)
    )
    findings.sort(key=lambda f: list(KINDS).index(f.kind))  # stable: each kind keeps its own order
    return Diagnosis(
        data=data_name,
        model=model_name,
        modality=splits.train.modality,
        classes=tuple(splits.classes),
        sizes=splits.sizes(),
        findings=tuple(findings),
        threshold=float(threshold),
        folds=used,
        probe_accuracy=accuracy,
        estimated_label_errors=noise,
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
        label_scores=scores,
        splits=splits,
    )


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, *, k: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[np.ndarray, int]:
    """(n, K) probabilities, row i from probes fitted without example i; and the folds used.

    The mean of the logistic probe of `crossval.cross_validated_probe` and a cosine,
    distance-weighted KNN_NEIGHBOURS-nearest-neighbour vote, both on the same stratified folds
    (see the module docstring for why two). Columns are the classes 0..K-1 with K = labels.max() + 1.
    """
    from sklearn.neighbors import KNeighborsClassifier

    from transferkit.stats.crossval import cross_validated_probe

    probe = cross_validated_probe(features, labels, k=k, seed=seed)
    n_classes = int(labels.max()) + 1
    linear = np.zeros((len(labels), n_classes))
    linear[:, probe.classes] = probe.probabilities
    neighbours = np.zeros_like(linear)
    for fold in range(probe.k):
        test = probe.fold_of == fold
        knn = KNeighborsClassifier(min(KNN_NEIGHBOURS, int((~test).sum())), weights="distance", metric="cosine")
        knn.fit(features[~test], labels[~test])
        neighbours[np.ix_(test, knn.classes_)] = knn.predict_proba(features[test])
    return (linear + neighbours) / 2, probe.k


def _label_findings(
    splits: DataSplits, features: Mapping[str, np.ndarray], ids: dict, folds: int, seed: int, notes: list[str]
) -> tuple[list[Finding], float | None, float | None, int, dict]:
    """Confident learning on train + val's out-of-fold probabilities: findings, accuracy, noise share, folds, scores."""
    if folds == 0:
        notes.append("Label check off (folds=0).")
        return [], None, None, 0, {}
    x = np.concatenate([features["train"], features["val"]])
    y = np.concatenate([splits.train.labels, splits.val.labels])
    try:
        probs, used = out_of_fold_probabilities(x, y, k=folds, seed=seed)
        issues = find_label_issues(y, probs)
    except UsageError as e:  # a class with one example, a single class: the check cannot run, the others can
        notes.append(f"Label check skipped: {e}")
        return [], None, None, 0, {}
    where = [("train", i) for i in range(len(splits.train))] + [("val", i) for i in range(len(splits.val))]
    classes = splits.classes
    findings = []
    for k, suggested, confidence in zip(issues.indices, issues.suggested_labels, issues.self_confidence):
        split, i = where[k]
        findings.append(Finding("label", split, i, ids[split][i], classes[y[k]], classes[suggested], float(1 - confidence)))
    joint = issues.confident_joint
    noise = float((joint.sum() - np.trace(joint)) / joint.sum())
    given = 1 - probs[np.arange(len(y)), y]
    scores = {"train": given[: len(splits.train)], "val": given[len(splits.train) :]}
    return findings, float((probs.argmax(1) == y).mean()), noise, used, scores


def _pair_findings(splits: DataSplits, features: Mapping[str, np.ndarray], ids: dict, threshold: float) -> list[Finding]:
    """Near-copies over all splits at once (input similarity), classified as leakage, conflict or duplicate."""
    loaded = (getattr(splits, s).load(i) for s in SPLIT_NAMES for i in range(len(getattr(splits, s))))
    copies = find_copies(loaded, splits.train.modality, threshold=threshold)
    x = np.concatenate([features[s] for s in SPLIT_NAMES]).astype(np.float64)
    x = x - x.mean(axis=0)  # centred: pooled features share a large positive component
    norms = np.linalg.norm(x, axis=1)
    where = [(s, i) for s in SPLIT_NAMES for i in range(len(features[s]))]
    split_of = [s for s, _ in where]
    labels = np.concatenate([getattr(splits, s).labels for s in SPLIT_NAMES])
    pairs = [SimilarPair(p.i, p.j, p.similarity) for p in copies]
    classes = splits.classes
    out = []
    for p in classify_pairs(pairs, split_of, labels):
        (si, i), (sj, j) = where[p.i], where[p.j]
        scale = norms[p.i] * norms[p.j]
        cosine = float(x[p.i] @ x[p.j] / scale) if scale > 0 else 0.0
        out.append(
            Finding(p.kind, si, i, ids[si][i], classes[labels[p.i]], None, p.cosine, sj, j, ids[sj][j], classes[labels[p.j]], cosine=cosine)
        )
    return out


def _identical_files(splits: DataSplits, ids: dict) -> list[Finding]:
    """The scanner's byte-identical val/test files (they stay in the data; reported here with the rest)."""
    flagged = set(splits.summary.warnings.get("duplicates_across_splits", []))
    out = []
    for split in ("val", "test"):
        labels = getattr(splits, split).labels
        out += [
            Finding("identical-file", split, i, name, splits.classes[labels[i]], None, 1.0)
            for i, name in enumerate(ids[split])
            if name in flagged
        ]
    return out


def _outlier_findings(splits: DataSplits, features: Mapping[str, np.ndarray], ids: dict) -> list[Finding]:
    """Outliers of each split among the examples of their own class in that split."""
    out = []
    for split in SPLIT_NAMES:
        labels = getattr(splits, split).labels
        if len(labels) < 2:
            continue
        out += [
            Finding("outlier", split, o.index, ids[split][o.index], splits.classes[labels[o.index]], None, o.score)
            for o in outliers(features[split], labels)
        ]
    return out
