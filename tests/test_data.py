import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, make_image, write_folder
from transferkit.data import ArrayImages, cache_dir, load_data
from transferkit.data.images import open_image
from transferkit.data.sources import load_eval_images
from transferkit.data.splits import stratified_indices
from transferkit.errors import DataError, UsageError


def test_digits_split_is_stratified_seeded_and_disjoint():
    a, b = load_data("digits", seed=3), load_data("digits", seed=3)
    assert a.sizes() == {"train": 1259, "val": 270, "test": 268}
    assert isinstance(a.train, ArrayImages)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    ids = [set(getattr(a, s).identities()) for s in ("train", "val", "test")]
    assert sum(len(i) for i in ids) >= 1797 - 20  # a few digits images are exact duplicates
    counts = np.bincount(a.val.labels)
    assert counts.min() >= 26 and counts.max() <= 29  # each class ~15%
    assert load_data("digits", seed=4).test.identities() != a.test.identities()


def test_stratified_indices_partition_everything():
    labels = np.repeat(np.arange(4), [3, 10, 50, 7])
    parts = stratified_indices(labels, (0.6, 0.2, 0.2), seed=0)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    for p in parts:
        assert set(labels[p]) == {0, 1, 2, 3}  # every class in every split


def test_image_folder_decodes_messy_files_and_reports_corrupt(tmp_path):
    root = write_folder(tmp_path / "data", per_class=6)
    make_image(COLOURS["red"], 99, mode="L").save(root / "red" / "grey.png")
    make_image(COLOURS["green"], 98, mode="RGBA").save(root / "green" / "alpha.png")
    (root / "blue" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    splits = load_data(root, seed=0)
    assert sum(splits.sizes().values()) == 20
    assert splits.classes == ["blue", "green", "red"]
    # A JPEG start marker followed by junk reads as a JPEG that ends early.
    assert splits.summary.skipped == {"truncated": [str(root / "blue" / "broken.jpg")]}
    assert "Skipped 1 of 21 files" in splits.summary.line() and "broken.jpg" in splits.summary.line()
    for s in ("train", "val", "test"):
        images = getattr(splits, s)
        for i in range(len(images)):
            img = images.load(i)
            assert img.mode == "RGB"
    with pytest.raises(DataError, match=r"broken\.jpg.*--strict"):
        load_data(root, strict=True)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_csv_source_with_relative_paths(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=5)
    rows = ["path,label"] + [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.*"))]
    rows.append("imgs/missing.png,red")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    splits = load_data(tmp_path / "labels.csv", seed=1)
    assert sum(splits.sizes().values()) == 15
    assert splits.summary.skipped == {"missing": [str(tmp_path / "imgs/missing.png")]}


def test_bad_csv_header_names_the_fix(tmp_path):
    (tmp_path / "x.csv").write_text("file,cls\na.png,b\n")
    with pytest.raises(DataError, match="path,label"):
        load_data(tmp_path / "x.csv")


def test_given_train_val_test_folders_are_used_as_is(tmp_path):
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        write_folder(tmp_path / "d" / split, per_class=n, seed=n)
    splits = load_data(tmp_path / "d")
    assert splits.sizes() == {"train": 18, "val": 9, "test": 12}
    images, _ = load_eval_images(tmp_path / "d", splits.classes)
    assert len(images) == 12  # evaluate reads test/


def test_dataset_problems_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="No images found"):
        load_data(tmp_path / "empty")
    write_folder(tmp_path / "one", per_class=4)
    for name in ("green", "blue"):
        for f in (tmp_path / "one" / name).iterdir():
            f.unlink()
    with pytest.raises(DataError, match="at least two"):
        load_data(tmp_path / "one")
    with pytest.raises(DataError, match="Did you mean: cifar10"):
        load_data("cifar1O")
    with pytest.raises(UsageError, match="sum to 1"):
        load_data("digits", split=(0.5, 0.2, 0.2))


def test_class_too_small_to_split(tmp_path):
    root = write_folder(tmp_path / "d", per_class=5)
    for f in sorted((root / "red").iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match=r"Class 'red'.*1 image"):
        load_data(root)


def test_cifar10_through_torchvision_real_loader(monkeypatch):
    """torchvision's own CIFAR10 code reads a tiny file in CIFAR's on-disk format; only the md5 check is patched."""
    import torchvision.datasets as tvd

    folder = cache_dir() / "datasets" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = list(np.arange(n) % 10)
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": labels}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(20)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(30)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *args, **kwargs: True)

    splits = load_data("cifar10", seed=0)
    assert splits.classes == names
    assert len(splits.test) == 30 and len(splits.train) + len(splits.val) == 100
    img = splits.train.load(0)
    assert img.size == (32, 32) and img.mode == "RGB"


def test_fit_on_paths_and_labels_scans_and_skips_unreadable_files(tmp_path):
    from transferkit import ImageClassifier

    root = write_folder(tmp_path / "c", per_class=6)
    paths = sorted(p for p in root.rglob("*.*"))
    labels = [p.parent.name for p in paths]
    (root / "red" / "bad.jpg").write_bytes(b"junk")
    clf = ImageClassifier(strategy="feature-extraction", image_size=32, progress=False)
    clf.fit([*paths, root / "red" / "bad.jpg"], [*labels, "red"])
    assert sum(clf.data_summary_["skipped"].values()) == 1 and sum(clf.metrics_["split_sizes"].values()) == 18
    assert clf.classes_ == ["blue", "green", "red"]
    with pytest.raises(UsageError, match="pair up"):
        ImageClassifier(progress=False).fit(paths, labels[:-1])


@pytest.mark.parametrize(("val_name", "test_name"), [("valid", "test"), ("validation", "testing"), ("dev", "test"), ("VAL", "Test")])
def test_common_split_folder_names_are_used_as_given(tmp_path, val_name, test_name):
    for split, n in (("train", 6), (val_name, 3), (test_name, 3)):
        write_folder(tmp_path / "d" / split, per_class=n, seed=len(split))
    splits = load_data(tmp_path / "d")
    assert splits.sizes() == {"train": 18, "val": 9, "test": 9}  # nothing dropped: 36 of 36


def test_an_unknown_folder_beside_train_is_refused_with_the_accepted_names(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=6)
    write_folder(tmp_path / "d" / "holdout", per_class=2)
    with pytest.raises(DataError, match="'holdout' names no split") as info:
        load_data(tmp_path / "d")
    assert "valid" in str(info.value) and "testing" in str(info.value)


def test_a_csv_whose_files_are_missing_says_they_are_missing_and_where_it_looked(tmp_path):
    (tmp_path / "x.csv").write_text("path,label\nimgs/a.png,cat\nimgs/b.png,dog\n")
    with pytest.raises(DataError, match="None of the 2 image files listed") as info:
        load_data(tmp_path / "x.csv")
    assert f"relative to {tmp_path}" in str(info.value) and "replace" not in str(info.value).lower()


def test_a_missing_data_file_is_named_as_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "missing.csv")


def test_an_image_csv_with_another_path_column_name_is_images(tmp_path):
    from transferkit.data import detect_modality

    root = write_folder(tmp_path / "c", per_class=4)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.*"))]
    (tmp_path / "files.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    modality, why = detect_modality(tmp_path / "files.csv")
    assert modality == "image" and "column 'file'" in why
    (tmp_path / "texts.csv").write_text("text,label\ngood film,pos\nbad film,neg\n")
    assert detect_modality(tmp_path / "texts.csv")[0] == "text"
