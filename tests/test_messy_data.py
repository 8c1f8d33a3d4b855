"""A folder with every kind of mess real image collections have: each file loads as RGB or is skipped and counted."""

import os
import shutil
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, invoke_cli, make_image, write_folder
from transferkit.data import inspect_image, load_data
from transferkit.errors import DataError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with (almost) no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def exif_rotated(path: Path) -> None:
    """Stored 40x20, left half red, right half blue; EXIF orientation 6 shows it turned 90 degrees clockwise."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20], arr[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def palette_with_transparency(path: Path) -> None:
    """Left half transparent (index 0), right half green (index 1)."""
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    img.paste(1, (10, 0, 20, 20))
    img.save(path, transparency=0)


def write_messy_class(cat: Path, dog: Path) -> None:
    for i in range(4):
        make_image(COLOURS["red"], 500 + i).save(cat / f"good_{i:02d}.png")
        make_image(COLOURS["blue"], 600 + i).save(dog / f"good_{i:02d}.png")
    make_image(COLOURS["red"], 700, mode="L").save(cat / "gray.png")
    make_image(COLOURS["red"], 701, mode="RGBA").save(cat / "rgba.png")
    make_image(COLOURS["red"], 702).convert("P", palette=Image.Palette.ADAPTIVE).save(cat / "palette.png")
    palette_with_transparency(cat / "palette_alpha.png")
    Image.fromarray(np.linspace(1000, 60000, 24 * 24).reshape(24, 24).astype(np.uint16)).save(cat / "deep16.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(cat / "cmyk.jpg")
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    frames[0].save(cat / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif_rotated(cat / "rotated.jpg")
    make_image(COLOURS["red"], 703).save(cat / "chat été 01.png")
    make_image(COLOURS["red"], 704).save(cat / "with space.jpg")
    (cat / "sub").mkdir()
    make_image(COLOURS["red"], 705).save(cat / "sub" / "nested.png")
    os.symlink("..", cat / "sub" / "up")  # points at cat/, the folder holding sub/: a loop

    full = (cat / "good_00.png").read_bytes()
    jpeg = cat / "with space.jpg"
    (cat / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("not an image, just notes\n")
    (cat / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (cat / "._good_00.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # AppleDouble resource fork
    (cat / ".thumbs").mkdir()
    (cat / ".thumbs" / "t.png").write_bytes(full)

    make_image(COLOURS["green"], 800).save(cat / "same.png")
    shutil.copyfile(cat / "same.png", dog / "same_copy.png")  # identical bytes, two labels


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """train/ val/ test/ given; train/ holds every kind of problem, test/ one file copied from train/."""
    root = tmp_path / "messy"
    train = root / "train"
    for name in ("cat", "dog", "bird", "empty"):
        (train / name).mkdir(parents=True)
    write_messy_class(train / "cat", train / "dog")
    make_image(COLOURS["green"], 900).save(train / "bird" / "only.png")  # a class with a single image
    os.symlink(".", train / "all")  # a "class folder" that is the split folder itself
    for split, seed in (("val", 1), ("test", 2)):
        for name, colour in (("cat", "red"), ("dog", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                make_image(COLOURS[colour], 1000 * seed + 10 * i + len(name)).save(root / split / name / f"{i}.png")
    shutil.copyfile(train / "cat" / "good_00.png", root / "test" / "cat" / "leak.png")
    return root


def test_messy_folder_exact_summary(messy_folder):
    root, train = messy_folder, messy_folder / "train"
    splits = load_data(root)
    s = splits.summary
    assert {k: sorted(v) for k, v in s.skipped.items()} == {
        "truncated": [str(train / "cat" / "truncated.jpg")],
        "empty": [str(train / "cat" / "empty.jpg")],
        "unreadable": [str(train / "cat" / "notes.jpg")],
        "too large": [str(train / "cat" / "bomb.png")],
        "conflicting labels": [str(train / "cat" / "same.png"), str(train / "dog" / "same_copy.png")],
        "symlink loop": [str(train / "all"), str(train / "cat" / "sub" / "up")],
    }
    assert s.warnings == {"duplicates_across_splits": [str(root / "test" / "cat" / "leak.png")], "empty_classes": [str(train / "empty")]}
    # 20 cat + 5 dog + 1 bird + 2 symlinks in train; 4 in val; 5 in test. Hidden files are not counted.
    assert s.found == 37 and s.n_skipped == 8
    assert s.to_dict()["skipped"] == {
        "truncated": 1,
        "empty": 1,
        "unreadable": 1,
        "too large": 1,
        "conflicting labels": 2,
        "symlink loop": 2,
    }
    assert s.to_dict()["warnings"] == {"duplicates_across_splits": 1, "empty_classes": 1}
    assert splits.classes == ["bird", "cat", "dog"]
    assert splits.sizes() == {"train": 20, "val": 4, "test": 5}
    assert splits.train.class_counts() == {"bird": 1, "cat": 15, "dog": 4}
    line = s.line()
    assert line.startswith(
        f"Skipped 8 of 37 files in {root} (2 conflicting labels, 1 empty, 2 symlink loop, 1 too large, 1 truncated, 1 unreadable)"
    )
    assert "Warning: 1 val/test file(s) identical to a file in an earlier split" in line and "leak.png" in line
    every_path = [str(p) for part in (splits.train, splits.val, splits.test) for p in part.paths]
    assert not any("/." in p for p in every_path)  # hidden files and folders never enter
    assert str(train / "cat" / "chat été 01.png") in every_path and str(train / "cat" / "with space.jpg") in every_path


def test_messy_folder_every_kept_file_loads_as_rgb_the_right_way_round(messy_folder):
    train = load_data(messy_folder).train
    by_name = {p.name: train.load(i) for i, p in enumerate(train.paths)}
    assert all(img.mode == "RGB" for img in by_name.values())

    rotated = np.asarray(by_name["rotated.jpg"], dtype=int)
    assert rotated.shape == (40, 20, 3)  # turned upright: taller than wide
    assert np.abs(rotated[5, 10] - RED).max() < 40 and np.abs(rotated[35, 10] - BLUE).max() < 40  # left half on top
    deep = np.asarray(by_name["deep16.png"])
    assert deep.min() == 0 and deep.max() == 255  # 16-bit range scaled to 8 bits, not clipped
    assert np.abs(np.asarray(by_name["cmyk.jpg"], dtype=int)[12, 12] - RED).max() < 10
    assert tuple(np.asarray(by_name["animated.gif"])[8, 8]) == RED  # the first frame
    alpha = np.asarray(by_name["palette_alpha.png"])
    assert tuple(alpha[10, 2]) == (255, 255, 255) and tuple(alpha[10, 15]) == GREEN  # transparency onto white
    assert by_name["gray.png"].size == by_name["palette.png"].size == (40, 40)


def test_messy_folder_strict_names_every_problem(messy_folder):
    with pytest.raises(DataError, match=r"Skipped \d+ of \d+ files.*--strict"):
        load_data(messy_folder, strict=True)


def test_decompression_bomb_is_refused_from_its_header_alone(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))  # 10^10 pixels, 30 GB as RGB
    start = time.perf_counter()
    assert inspect_image(tmp_path / "bomb.png").reason == "too large"
    assert time.perf_counter() - start < 0.5


def test_image_over_max_pixels_is_refused_where_pil_would_only_warn(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d", per_class=4)  # 40x40 = 1,600 pixels each
    make_image(COLOURS["red"], 1, size=60).save(root / "red" / "big.png")  # 3,600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # big.png is under 2x: PIL itself only warns
    filters = list(warnings.filters)
    splits = load_data(root)
    assert splits.summary.skipped == {"too large": [str(root / "red" / "big.png")]}
    assert warnings.filters == filters  # the scan's warnings-as-errors does not leak out


def test_one_class_only_is_a_clear_error(tmp_path):
    root = write_folder(tmp_path / "d", per_class=4)
    shutil.rmtree(root / "green")
    shutil.rmtree(root / "blue")
    with pytest.raises(DataError, match=rf"{root} has 1 class with usable images \(\['red'\]\).*at least two"):
        load_data(root)


def test_class_too_small_to_split_names_class_folder_and_fix(tmp_path):
    root = write_folder(tmp_path / "d", per_class=4)
    (root / "bird").mkdir()
    make_image(COLOURS["green"], 1).save(root / "bird" / "only.png")
    with pytest.raises(DataError, match=rf"Class 'bird' in {root} has 1 image.*Add images to that class"):
        load_data(root)


def test_no_images_at_all_is_a_clear_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
    (tmp_path / "d" / "a" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match=rf"No images found in {tmp_path / 'd'}\. Expected one subfolder per class"):
        load_data(tmp_path / "d")


def test_only_broken_files_says_what_was_skipped(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "x.jpg").write_text("text")
    with pytest.raises(DataError, match=r"No usable images in .*Skipped 2 of 2 files .*2 unreadable"):
        load_data(tmp_path / "d")


def test_images_without_class_folders_say_how_to_arrange_them(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        make_image(COLOURS["red"], i).save(tmp_path / "d" / f"{i}.png")
    with pytest.raises(DataError, match="Move them into one subfolder per class"):
        load_data(tmp_path / "d")


def test_cli_reports_a_dataset_problem_without_traceback(tmp_path):
    root = write_folder(tmp_path / "d", per_class=4)
    shutil.rmtree(root / "green")
    shutil.rmtree(root / "blue")
    proc = invoke_cli("fit", str(root), "--out", str(tmp_path / "run"), "-q", check=False)
    assert proc.returncode == 1
    assert "at least two" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
