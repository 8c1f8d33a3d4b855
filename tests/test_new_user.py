"""Issue 28's smaller defects, found by trying transferkit as a new user would: each test fails on the code before
its fix."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import write_folder


def _spreadsheet_csv(tmp_path: Path) -> Path:
    """A CSV as spreadsheet tools write it: UTF-8 BOM, CRLF line ends, a `file` column, labels with trailing spaces."""
    root = write_folder(tmp_path / "imgs", per_class=6)
    rows = ["file,label"] + [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}  " for p in sorted(root.rglob("*.*"))]
    path = tmp_path / "bom.csv"
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
    return path


def test_item4_a_spreadsheet_csv_with_a_file_column_trains_with_stripped_labels(tmp_path, caplog):
    from transferkit import ImageClassifier
    from transferkit.data import detect_modality, load_data

    path = _spreadsheet_csv(tmp_path)
    assert detect_modality(path)[0] == "image"
    splits = load_data(path, seed=0)
    assert splits.classes == ["blue", "green", "red"]
    assert len(splits.summary.warnings["labels_stripped"]) == 18
    assert "label(s) with surrounding spaces, stripped" in splits.summary.line()
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        clf = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction", image_size=32, progress=False).fit(path)
    assert list(clf.classes_) == ["blue", "green", "red"]
    assert "stripped" in caplog.text
