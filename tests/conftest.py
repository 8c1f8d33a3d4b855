"""Shared fixtures: an isolated cache, generated image folders, a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Every test session gets its own feature/dataset cache."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TRANSFERKIT_CACHE")
    os.environ["TRANSFERKIT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("TRANSFERKIT_CACHE", None)
    else:
        os.environ["TRANSFERKIT_CACHE"] = old


def make_image(colour: tuple[int, int, int], seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    """A noisy image dominated by `colour` with a random bright square: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 35, (size, size, 3)), 0, 255).astype(np.uint8)
    x, y = rng.integers(0, size - 12, 2)
    arr[y:y + 10, x:x + 10] = 255
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


def write_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """root/<colour>/<n>.png|jpg: alternating PNG and JPEG."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make_image(colour, seed * 1000 + c * 100 + i)
            img.save(root / name / (f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_folder(tmp_path / "colours")


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `transferkit` console entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"transferkit {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu")  # Debian's chromium as root in a container


def chromium_path() -> str:
    """Debian's chromium: skipped outside CI when it is missing, required in CI (.ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed here (.ci/run installs it)")
    assert path, "CI must install Debian's chromium (see .ci/run)"
    return path


@pytest.fixture(autouse=True)
def library_logging():
    """An in-process CLI call attaches its handler to the 'transferkit' logger; each test starts from the default."""
    import logging

    logger = logging.getLogger("transferkit")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
