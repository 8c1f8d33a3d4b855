"""Shared fixtures: an isolated cache, generated image folders, the CLI in-process and in a subprocess, and the
session's shared runs (a digits probe, a tiny fine-tune with its checkpoint, the colours run), fitted once each.

A test that only reads a shared run uses it as it is; a test that changes one works on a copy (`copy_run`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}

# The suite's frozen passes run in torch, the same on every CI machine (a bf16 CPU would make OpenVINO's numbers
# differ from torch's); tests/test_openvino.py runs the OpenVINO engine and the `auto` default explicitly. The CLI
# subprocesses inherit the variable.
os.environ["TRANSFERKIT_ENGINE"] = "torch"


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
    arr[y : y + 10, x : x + 10] = 255
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


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `transferkit` console entry point in a subprocess (`env` adds to the environment)."""
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"transferkit {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def invoke_cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a `transferkit` command in this process with typer's CliRunner, as `run_cli` runs it in a subprocess.

    The same parsing, error rendering (`handles_errors`) and exit status as the console script, without paying a new
    interpreter's torch and timm import. It answers as `run_cli` does (returncode, stdout, stderr); an exception that
    escaped the command's own error handling is appended to stderr as the traceback the console script would print,
    so `"Traceback" not in proc.stderr` means the same in both. `env` is set only while the command runs; a variable
    a library reads once at import (HF_HUB_OFFLINE, HF_ENDPOINT) needs `run_cli`.
    """
    from typer.testing import CliRunner

    from transferkit.cli.app import app

    # What a command changes for its process (the log handler, warning filters, variables it sets by default, the
    # working directory) is put back, so a session fixture that calls the CLI leaves the tests after it as they were.
    logger = logging.getLogger("transferkit")
    saved_logger, saved_env, here = (logger.handlers[:], logger.level, logger.propagate), dict(os.environ), Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})
    finally:
        os.chdir(here)
        logger.handlers[:], logger.level, logger.propagate = saved_logger
        os.environ.clear()
        os.environ.update(saved_env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    proc = subprocess.CompletedProcess(["transferkit", *args], result.exit_code, result.stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"transferkit {' '.join(args)} exited {proc.returncode} (in-process)\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a shared run for a test that writes into it (resumes, extends, exports), so the session's stays as fitted."""
    return Path(shutil.copytree(run, to))


# --------------------------------------------------------------------------- the session's shared runs


@pytest.fixture(scope="session")
def colours_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real feature-extraction run of the built-in backbone on the generated colours (64 px): (run dir, image folder).

    Shared by the modules that read a run; a test that writes into a run works on a copy (or, as the export tests do,
    only adds export files beside the model).
    """
    from transferkit import ImageClassifier

    root = tmp_path_factory.mktemp("colours-run")
    images = write_folder(root / "colours")
    clf = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction", image_size=64, progress=False).fit(images)
    return clf.save(root / "run"), images


@dataclass(frozen=True)
class CliRun:
    """A run the CLI fitted: its folder, the command's arguments (without --out) and answer, and the feature cache it filled."""

    out: Path
    args: tuple[str, ...]
    proc: subprocess.CompletedProcess
    cache: Path
    data: Path | None = None


# The digits demo's probe at its own small size (64 px; at 32 px the probe falls below 90%), in fp32 on every CPU.
DIGITS_PROBE = ("digits", "--strategy", "feature-extraction", "--precision", "fp32", "-q")


@pytest.fixture(scope="session")
def digits_probe_run(tmp_path_factory) -> CliRun:
    """`transferkit fit digits` as a feature-extraction probe (64 px, fp32), in-process, with a feature cache of its own.

    Its own cache makes its extraction a certain miss whichever test ran first; a test that must hit it sets
    TRANSFERKIT_CACHE to `cache`.
    """
    root = tmp_path_factory.mktemp("digits-probe")
    args = ("fit", *DIGITS_PROBE)
    proc = invoke_cli(*args, "--out", str(root / "run"), env={"TRANSFERKIT_CACHE": str(root / "cache")})
    return CliRun(root / "run", args, proc, root / "cache")


# A fine-tune of the top block for 3 epochs on 48 generated images at 32 px: a checkpoint in seconds.
FINETUNE = ("--strategy", "finetune:last=1", "--epochs", "3", "--image-size", "32", "--precision", "fp32", "--batch-size", "8", "-q")


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory) -> CliRun:
    """`transferkit fit COLOURS --strategy finetune:last=1 --epochs 3` in-process: a finished run with its checkpoint.

    What an interrupted fit of the same data and options must equal once resumed; resume and extension tests work on
    a copy of it (`copy_run`). `args` without `--out`, `data` the image folder (16 per class).
    """
    root = tmp_path_factory.mktemp("finetune-run")
    data = write_folder(root / "colours", per_class=16)
    args = ("fit", str(data), *FINETUNE)
    proc = invoke_cli(*args, "--out", str(root / "run"))
    return CliRun(root / "run", args, proc, Path(os.environ["TRANSFERKIT_CACHE"]), data)


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
    logger = logging.getLogger("transferkit")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


TINY = dict(image_size=32, epochs=2, batch_size=8, progress=False, precision="fp32")  # a few-second image fit


def finetune_phase_alone(splits, spec: str, **settings):
    """The strategy's image phase run on its own from the pretrained weights, as a fit runs it after the probe.

    A fit keeps the probe's weights when no fine-tuning epoch beats it on validation, which on these few images
    (the probe at 100%) it cannot; alone, the phase's own weights and BatchNorm statistics are what it leaves.
    Returns the backbone and the phase's notes.
    """
    import torch

    from transferkit.backbones import load_backbone
    from transferkit.cache.features import FeatureCache
    from transferkit.training.config import DEFAULT_CACHE_BUDGET_GB, TrainConfig
    from transferkit.training.strategies import parse_strategy, plan_phases
    from transferkit.training.trainer import Precision, Trainer

    bb = load_backbone("builtin:efficientnet_lite0", len(splits.classes))
    bb.configure_input(TINY["image_size"], splits.train.preprocess_hint)
    cfg = TrainConfig(epochs=TINY["epochs"], batch_size=TINY["batch_size"], precision=TINY["precision"])
    trainer = Trainer(
        bb,
        splits,
        cfg,
        device=torch.device("cpu"),
        precision=Precision(None, None),
        cache=FeatureCache.default(),
        cache_budget_gb=DEFAULT_CACHE_BUDGET_GB,
        **settings,
    )
    phase = plan_phases(parse_strategy(spec), cfg.epochs, None, len(bb.blocks))[-1]
    trainer.run(phase)
    return bb, trainer.phase_notes[phase.name]
