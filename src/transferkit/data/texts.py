"""Where labelled texts come from: CSV, TSV or JSON Lines files with a text and a label column.

Every source becomes a :class:`TextSet`, an :class:`~transferkit.data.examples.Examples`
like an image set (labels, classes, ``subset``, ``identities``), so the
stratified split, learning-curve subsampling and bad-input rules are the same
for both:

=====================  ========================================================
``empty text``          a row whose text is blank (skipped and counted, like an
                        unreadable image)
``incomplete row``      a row without a label
``conflicting labels``  the same text under two labels: every copy is skipped
``unknown class``       a label the model does not know (evaluation)
=====================  ========================================================

A missing column is an error that lists the columns the file has; a class
with fewer examples than there are splits is an error naming the class.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from transferkit.data.examples import DEFAULT_SPLIT, DataSplits, DataSummary, Examples, IntArrayLike
from transferkit.data.splits import drop_conflicting_labels, note_cross_split_duplicates, stratified_splits, validate_split
from transferkit.errors import DataError, UsageError, did_you_mean

TEXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TEXT_COLUMN, LABEL_COLUMN = "text", "label"


class TextSet(Examples):
    """Labelled texts of one split. `paths` name each row ("file:row") for reports; `digests` hash the text."""

    modality = "text"
    noun = "text"

    def __init__(self, texts: Sequence[str], labels: IntArrayLike, classes: Sequence[str], name: str, rows: Sequence[str] | None = None):
        super().__init__(labels, classes, name)
        self.texts = list(texts)
        self.paths = list(rows) if rows is not None else [f"{name}:{i + 1}" for i in range(len(self.texts))]
        self.digests: list[str] = [text_digest(t) for t in self.texts]  # always known: the texts are in memory

    def load(self, i: int) -> str:
        return self.texts[i]

    def identities(self) -> list[str]:
        return self.digests  # content, not position: the same texts give the same cached features

    def loader_workers(self) -> int:
        return 0  # in memory; the tokenizer works on whole batches in the main process

    def subset(self, indices: IntArrayLike) -> TextSet:
        idx = [int(i) for i in indices]
        return TextSet([self.texts[i] for i in idx], self.labels[idx], self.classes, self.name, [self.paths[i] for i in idx])


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def is_text_file(source: str | Path) -> bool:
    """A .tsv/.jsonl/.ndjson file, or a .csv whose header has no 'path' column: labelled texts, not images."""
    path = Path(source)
    kind = TEXT_FORMATS.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return False
    if kind != "csv":
        return True
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "path" not in [c.strip().lower() for c in header]


def read_records(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The column names and (row number, record) pairs of a CSV, TSV or JSON Lines file."""
    kind = TEXT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"Text data {path} must end in {', '.join(TEXT_FORMATS)}; got '{path.suffix}'.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            if kind == "jsonl":
                records = [(n, json.loads(line)) for n, line in enumerate(fh, start=1) if line.strip()]
                bad = next((n for n, r in records if not isinstance(r, dict)), None)
                if bad is not None:
                    raise DataError(f'{path} line {bad} is not a JSON object; each line must be like {{"text": "...", "label": "..."}}.')
                columns = list(dict.fromkeys(k for _, r in records for k in r))
                return columns, records
            reader = csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ",")
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            return columns, [(n, r) for n, r in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as e:
        raise DataError(
            f"Cannot read {path}: {e}. Save it as UTF-8 {kind.upper()} with a header row "
            f"(or one JSON object per line) holding a text and a label column."
        ) from e


def _column(columns: list[str], wanted: str, option: str, path: Path) -> str:
    """The column (a JSON Lines file's key) named `wanted`, matched without regard to case; else a DataError listing
    the columns and the fix for this kind of file."""
    by_lower = {c.lower(): c for c in columns}
    if wanted.lower() in by_lower:
        return by_lower[wanted.lower()]
    kind = TEXT_FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        raise DataError(
            f"{path} has no key '{wanted}' in its JSON objects. Their keys: {', '.join(columns) or '(none)'}."
            f"{did_you_mean(wanted, columns)} Name the right one with {option} KEY, or write each line as "
            '{"text": "...", "label": "..."}.'
        )
    images = " For images, the first line must be path,label (paths relative to the CSV)." if kind == "csv" else ""
    raise DataError(
        f"{path} has no column '{wanted}'. Its columns: {', '.join(columns) or '(none)'}."
        f"{did_you_mean(wanted, columns)} For texts, name the right one with {option} COLUMN.{images}"
    )


def read_text_file(
    path: Path, summary: DataSummary, *, text_column: str = TEXT_COLUMN, label_column: str = LABEL_COLUMN, classes: list[str] | None = None
) -> TextSet:
    """Read labelled texts; blank texts and rows without a label are skipped and counted in `summary`."""
    columns, records = read_records(path)
    text_col = _column(columns, text_column, "--text-column", path)
    label_col = _column(columns, label_column, "--label-column", path)
    texts, names, rows = [], [], []
    for n, record in records:
        text, label = record.get(text_col), record.get(label_col)
        text = "" if text is None else str(text).strip()
        label = "" if label is None else str(label).strip()
        summary.found += 1
        where = f"{path}:{n}"
        if not text:
            summary.skip("empty text", where)
        elif not label:
            summary.skip("incomplete row", where)
        elif classes is not None and label not in classes:
            summary.skip("unknown class", where)
        else:
            texts.append(text)
            names.append(label)
            rows.append(where)
    classes = classes or sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return TextSet(texts, [index[c] for c in names], classes, str(path), rows)


def load_text_data(
    source: str | Path,
    *,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    strict: bool = False,
) -> DataSplits:
    """Labelled texts from a CSV/TSV/JSONL file, split stratified and seeded.

    Example:
        >>> splits = load_text_data("reviews.csv", text_column="review", label_column="stars")  # doctest: +SKIP
    """
    split = validate_split(split)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"Text data file {path} does not exist. Give a .csv, .tsv or .jsonl file with a text and a label column.")
    summary = DataSummary(str(path), noun="text")
    [texts] = drop_conflicting_labels([read_text_file(path, summary, text_column=text_column, label_column=label_column)], summary, strict)
    if strict and summary.n_skipped:
        raise DataError(f"{summary.skipped_line()}. Fix these rows, or drop --strict to skip them.")
    if len(set(texts.labels.tolist())) < 2:
        n = len(set(texts.labels.tolist()))
        raise DataError(
            f"{path} has {n} {'class' if n == 1 else 'classes'} with usable texts ({texts.classes}); "
            f"a classifier needs at least two. Column '{label_column}' must hold each text's class."
            + (f" {summary.skipped_line()}." if summary.n_skipped else "")
        )
    splits = stratified_splits(texts, split, seed, str(path), summary)
    note_cross_split_duplicates(splits)
    return splits


def load_eval_texts(
    source: str | Path, classes: list[str], *, text_column: str = TEXT_COLUMN, label_column: str = LABEL_COLUMN
) -> tuple[TextSet, DataSummary]:
    """All labelled texts of a file, labelled with a trained model's `classes`."""
    path = Path(source).expanduser()
    summary = DataSummary(str(path), noun="text")
    texts = read_text_file(path, summary, text_column=text_column, label_column=label_column, classes=classes)
    if len(texts) == 0:
        raise DataError(f"No usable labelled texts in {path}" + (f": {summary.skipped_line()}." if summary.n_skipped else "."))
    return texts, summary


def as_text_set(texts, classes: list[str], labels: Sequence[str] | None = None) -> TextSet:
    """What `predict` and `score` take, as a TextSet: a list of texts (and their labels).

    Raises:
        UsageError: one string instead of a list, texts that are all image files (an image run's input),
            or labels that are not the model's classes.
    """
    from transferkit.data.images import IMAGE_EXTENSIONS

    if isinstance(texts, str | Path):
        raise UsageError(
            f"Pass a list of texts, not one {type(texts).__name__} ({str(texts)[:60]!r}): "
            "predict([text]) for one text, score(FILE) for a labelled file."
        )
    texts = [str(t) for t in texts]
    if texts and all(Path(t).suffix.lower() in IMAGE_EXTENSIONS and Path(t).is_file() for t in texts):
        raise UsageError(
            f"These inputs are image files ({texts[0]}, ...), and this is a text model: it would "
            "classify the file names. Use an image run for images."
        )
    if labels is not None and len(labels) != len(texts):
        raise UsageError(f"got {len(texts)} texts and {len(labels)} labels; they must pair up one to one.")
    unknown = sorted(set(labels or []) - set(classes))
    if unknown:
        raise UsageError(f"labels {unknown[:5]} are not classes of this model ({', '.join(classes)}).")
    index = {c: i for i, c in enumerate(classes)}
    return TextSet(texts, [index[v] for v in labels] if labels is not None else [0] * len(texts), classes, "texts")
