"""Crashes lose nothing: kill -9 during feature extraction, training and the final save, then finish.

Each kill test runs the real CLI in a subprocess (its own session, so the whole
process group, DataLoader workers included, dies as in a power cut) and checks
what is left on disk: no half-written cache entry is ever used, a run directory
never holds a half-written model or manifest, and finishing (a re-run or
``--resume``, in a new process after a kill during training, in-process after
the others) gives exactly the metrics of the session's run that was never
interrupted (conftest's `finetune_run`).
Polling waits for files, never for a guessed time, so slow machines only make
the tests slower.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FINETUNE, invoke_cli, write_folder
from transferkit import ImageClassifier
from transferkit.cache.features import FeatureCache
from transferkit.data import load_data

TIMEOUT = 300  # seconds for any one wait; generous for 2 shared CPU cores
FIT = list(FINETUNE[2:])  # the options of the session's fine-tune run after its --strategy: 3 epochs at 32 px, fp32

# Runs the CLI with os.replace pausing before it renames a file called argv[1] into place:
# the temporary file is complete (written and fsynced), the final name not yet there.
# The test kills the process there, the moment a non-atomic save would be half-written.
PAUSE_BEFORE_RENAME = """
import os, sys, time
from pathlib import Path
target, marker = sys.argv[1], Path(sys.argv[2])
real_replace = os.replace
def pausing_replace(src, dst, *args, **kwargs):
    if Path(dst).name == target:
        marker.write_text(str(src))
        time.sleep(3600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = pausing_replace
sys.argv = ["transferkit", *sys.argv[3:]]
from transferkit.cli.app import main
main()
"""


def env(cache: Path | None = None) -> dict:
    return {**os.environ, "COLUMNS": "200", **({"TRANSFERKIT_CACHE": str(cache)} if cache else {})}


def cli(*args: str) -> subprocess.CompletedProcess:
    """The console script in a new process: a resume after a kill, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, env=env(), timeout=600)


def start(argv: list[str], cache: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(cache), start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL the process group of `proc` as soon as `ready()` holds; fail if it exits or times out first."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def result(run: Path) -> tuple[dict, list[list[str]]]:
    """Test metrics and per-epoch history without wall times: what an exact resume must reproduce."""
    meta = json.loads((run / "transferkit.json").read_text())
    rows = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name != "seconds"]
    return meta["metrics"]["test"], [[r[i] for i in keep] for r in rows]


def assert_no_half_written_run(run: Path) -> None:
    """Model and manifest are each either absent or complete and loadable."""
    if (run / "model.safetensors").exists():
        load_file(str(run / "model.safetensors"))
    if (run / "transferkit.json").exists():
        json.loads((run / "transferkit.json").read_text())


@pytest.fixture
def colours(finetune_run) -> Path:
    """The session's fine-tune data: 16 generated images per class."""
    return finetune_run.data


@pytest.fixture
def uninterrupted(finetune_run) -> Path:
    """The session's run of `fit COLOURS --strategy finetune:last=1` with these options (FIT), never interrupted."""
    assert list(finetune_run.args[2:]) == ["--strategy", "finetune:last=1", *FIT]
    return finetune_run.out


# ---------------------------------------------------------------- feature extraction


@pytest.mark.subprocess
@pytest.mark.slow
def test_kill_during_feature_extraction_leaves_no_usable_half_entry(tmp_path):
    data = write_folder(tmp_path / "many", per_class=120)  # 252 train images: extraction takes seconds
    cache = tmp_path / "cache"
    args = ["fit", str(data), "--strategy", "feature-extraction", "--image-size", "64", "--precision", "fp32", "-q"]
    proc = start([sys.executable, "-m", "transferkit", *args, "--out", str(tmp_path / "cut")], cache)
    features = cache / "features"
    kill_when(proc, lambda: features.is_dir() and any(features.glob(".tmp-*")), "a .tmp-* extraction folder")

    leftovers = list(features.glob(".tmp-*"))
    assert leftovers, "the kill should have landed mid-extraction"
    entries = [p for p in features.iterdir() if not p.name.startswith(".")]
    assert all(FeatureCache(features).load(p.name) is not None for p in entries)  # complete ones verify
    # A file system that renamed the half-written folder into place anyway must not fool the cache either.
    half = leftovers[0]
    key = half.name.split("-")[1]
    if not (features / key).exists():
        half.rename(features / key)
    assert FeatureCache(features).load(key) is None and not (features / key).exists()

    again = invoke_cli(*args, "--out", str(tmp_path / "again"), env={"TRANSFERKIT_CACHE": str(cache)}, check=False)
    assert again.returncode == 0, again.stderr
    assert "train miss" in again.stdout
    assert not list(features.glob(".tmp-*")), "the dead process's temporary folders are cleaned up"
    clean = invoke_cli(*args, "--out", str(tmp_path / "clean"), env={"TRANSFERKIT_CACHE": str(tmp_path / "fresh-cache")}, check=False)
    assert clean.returncode == 0, clean.stderr
    assert result(tmp_path / "again") == result(tmp_path / "clean")
    assert not (tmp_path / "cut" / "transferkit.json").exists()


# ---------------------------------------------------------------- training


@pytest.mark.subprocess
@pytest.mark.slow
def test_kill_during_training_then_resume_equals_an_uninterrupted_run(colours, uninterrupted, tmp_path):
    out = tmp_path / "cut"
    argv = [sys.executable, "-m", "transferkit", "fit", str(colours), "--strategy", "finetune:last=1", "--out", str(out), *FIT]
    progress = out / "checkpoints" / "last.json"

    def trained_an_epoch() -> bool:
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            return False
        return state["phase"] == "finetune" and state["epoch"] >= 1

    kill_when(start(argv), trained_an_epoch, "a fine-tuning checkpoint")
    assert not (out / "transferkit.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads(progress.read_text())["epoch"] < 3
    resumed = cli(*argv[3:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    (metrics, history), (expected, expected_history) = result(out), result(uninterrupted)
    assert metrics == expected, {k: (metrics.get(k), expected.get(k)) for k in expected if metrics.get(k) != expected[k]}
    assert history == expected_history
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------- final save


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("target", ["model.safetensors", "transferkit.json"])
def test_kill_during_final_save_then_resume_only_saves(colours, uninterrupted, tmp_path, target):
    out, marker = tmp_path / "cut", tmp_path / "paused"
    args = ["fit", str(colours), "--strategy", "finetune:last=1", "--out", str(out), *FIT]
    proc = start([sys.executable, "-c", PAUSE_BEFORE_RENAME, target, str(marker), *args])
    kill_when(proc, marker.exists, f"the rename of {target}")

    temporary = Path(marker.read_text())
    # Killed mid-save, with its temporary file in the staging folder beside the run; the run is untouched.
    assert temporary.exists() and temporary.parent.name.startswith(f".{out.name}.saving-")
    assert not (out / target).exists() and not (out / "transferkit.json").exists()
    assert_no_half_written_run(out)
    done = json.loads((out / "checkpoints" / "last.json").read_text())
    assert done["phase"] == "done"  # all phases finished: only evaluation and the save remain

    predict = invoke_cli("predict", str(out), str(next(colours.glob("red/*"))), check=False)
    assert predict.returncode == 1
    assert "not a finished transferkit run" in predict.stderr and "--resume" in predict.stderr

    checkpoint = out / "checkpoints" / "last.pt"
    written = checkpoint.stat().st_mtime_ns
    resumed = invoke_cli(*args, "--resume", check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.stat().st_mtime_ns == written  # nothing trained again
    (metrics, history), (expected, expected_history) = result(out), result(uninterrupted)
    assert metrics == expected, {k: (metrics.get(k), expected.get(k)) for k in expected if metrics.get(k) != expected[k]}
    assert history == expected_history
    assert not list(out.glob(".*.tmp")) and not list(out.parent.glob(f".{out.name}.*"))  # the staging folder is gone
    assert invoke_cli("predict", str(out), str(next(colours.glob("red/*"))), check=False).returncode == 0


# ---------------------------------------------------------------- determinism


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    splits = load_data(write_folder(tmp_path / "colours", per_class=10), seed=0)
    settings = dict(strategy="finetune:last=1", image_size=32, epochs=2, batch_size=8, precision="fp32", device="cpu", progress=False)
    a, b, c = (ImageClassifier(**settings, seed=s).fit(splits) for s in (0, 0, 1))

    def comparable(clf):
        return {k: v for k, v in clf.metrics_.items() if k not in ("train_seconds", "feature_seconds")}, [
            {k: v for k, v in row.items() if k != "seconds"} for row in clf.history_
        ]

    assert comparable(a) == comparable(b)
    wa, wb = (clf.model_.state_dict() for clf in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Another seed trains differently (its epochs' losses); on this easy fixture the probe's weights may still win
    # on validation and be kept (a phase never ends worse than the one before), so the final weights can agree.
    assert comparable(a)[1] != comparable(c)[1]
    np.testing.assert_array_equal(a.predict_proba(splits.test), b.predict_proba(splits.test))


# ---------------------------------------------------------------- leftovers


@pytest.mark.subprocess  # a child process that has exited: a dead writer's pid
def test_temporary_folders_of_dead_or_old_writers_are_removed(tmp_path):
    from transferkit.cache.features import STALE_TMP_SECONDS, remove_abandoned_tmp_

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {
        "dead": f".tmp-k-{int(dead.stdout)}-1",
        "alive": f".tmp-k-{os.getppid()}-2",
        "old": f".tmp-k-{os.getppid()}-3",
        "other": ".tmp-unrelated",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(tmp_path / names["old"], (old, old))
    assert sorted(p.name for p in remove_abandoned_tmp_(tmp_path)) == sorted([names["dead"], names["old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["other"]])


def test_a_save_cut_short_never_pairs_a_new_model_with_an_old_manifest(tmp_path, monkeypatch):
    from transferkit.runs import directory as runs

    out = tmp_path / "run"
    out.mkdir()
    (out / runs.META_FILE).write_text("{}")  # the run this fit replaces

    class DiesWhileWriting:
        """A backbone whose model write is cut short (stands in for the process dying mid-save)."""

        def write_trained(self, folder):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.save_run(out, DiesWhileWriting(), {"metrics": {}})
    # The run being replaced stays whole (its manifest, no new model beside it), and no staging folder is left.
    assert (out / runs.META_FILE).read_text() == "{}" and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------- Ctrl-C


def interrupt_when(proc: subprocess.Popen, ready, what: str) -> str:
    """Send SIGINT (Ctrl-C) to `proc` once `ready()` holds; its stderr after it exits."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the process exited or timed out before {what}: {proc.communicate()}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return err


@pytest.mark.subprocess
@pytest.mark.slow
def test_ctrl_c_after_an_epoch_prints_one_pasteable_resume_command(colours, tmp_path):
    import shlex

    out = tmp_path / "my runs" / "cut"  # a space: the printed command must quote it
    argv = [sys.executable, "-m", "transferkit", "fit", str(colours), "--strategy", "finetune:last=1", "--out", str(out), *FIT]
    progress = out / "checkpoints" / "last.json"
    err = interrupt_when(start(argv), lambda: progress.is_file() and '"finetune"' in progress.read_text(), "a fine-tuning checkpoint")
    lines = err.splitlines()
    command = lines[lines.index(next(line for line in lines if "Continue with:" in line)) + 1]
    words = shlex.split(command)
    assert words[:2] == ["transferkit", "fit"] and words[-1] == "--resume" and str(out) in words
    assert "Traceback" not in err


@pytest.mark.subprocess
@pytest.mark.slow
def test_ctrl_c_before_any_checkpoint_does_not_promise_one(tmp_path):
    data = write_folder(tmp_path / "many", per_class=120)
    cache = tmp_path / "cache"
    argv = [
        sys.executable,
        "-m",
        "transferkit",
        "fit",
        str(data),
        "--strategy",
        "finetune:last=1",
        "--image-size",
        "64",
        "--precision",
        "fp32",
        "-q",
        "--out",
        str(tmp_path / "cut"),
    ]
    features = cache / "features"
    err = interrupt_when(start(argv, cache), lambda: features.is_dir() and any(features.glob(".tmp-*")), "extraction")
    assert "no checkpoint to resume" in err and "--resume" not in err and "Traceback" not in err
