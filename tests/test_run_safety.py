"""A run folder is safe to fit into: the user's files survive a refit, a finished run is replaced only when asked,
two fits never write one folder at once, and a resumed fit says where it continues (issue 28: 1, 2, 16)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_folder
from transferkit import ImageClassifier
from transferkit.errors import UsageError
from transferkit.runs.directory import META_FILE, check_out_dir, save_run
from transferkit.runs.lock import lock_file

TINY_FIT = ("--strategy", "feature-extraction", "--image-size", "32", "--precision", "fp32", "-q")
TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_fitted(tmp_path_factory):
    images = write_folder(tmp_path_factory.mktemp("safety") / "colours", per_class=6)
    clf = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction", image_size=32, precision="fp32").fit(images)
    return clf, images


def users_files(out: Path) -> dict[str, str]:
    """Files a user puts in a run folder: notes, a folder of photos, an exported model, a git repository."""
    (out / "photos").mkdir()
    files = {"my_analysis.md": "# notes", "photos/a.jpg": "jpeg", "model.onnx": "onnx bytes", ".git/HEAD": "ref: main"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def test_save_refuses_to_replace_a_finished_run_unless_asked_and_keeps_the_users_files(tiny_fitted, tmp_path, caplog):
    clf, _ = tiny_fitted
    out = clf.save(tmp_path / "run")
    files = users_files(out)
    before = (out / META_FILE).read_text()
    with pytest.raises(UsageError, match="holds a finished run") as refused:
        clf.save(out)
    assert str(out) in str(refused.value) and "--overwrite" in str(refused.value) and "overwrite=True" in str(refused.value)
    assert (out / META_FILE).read_text() == before
    with caplog.at_level(logging.INFO, logger="transferkit"):
        clf.save(out, overwrite=True)
    assert {name: (out / name).read_text() for name in files} == files  # every file transferkit did not write
    assert (out / "model.safetensors").is_file() and (out / META_FILE).is_file()
    assert "model.onnx" in caplog.text and "old model" in caplog.text  # the kept export is said to be stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left


def test_a_save_killed_between_its_renames_gets_the_previous_folder_back(tiny_fitted, tmp_path):
    clf, _ = tiny_fitted
    out = tmp_path / "run"
    # what a save killed after moving OUT aside, before moving the new run in, leaves: the previous folder beside OUT
    previous = tmp_path / ".run.old-abc" / "run"
    previous.mkdir(parents=True)
    (previous / "my_analysis.md").write_text("mine")
    (previous / "checkpoints").mkdir()
    save_run(out, clf.backbone_, clf.run_meta())
    assert (out / "my_analysis.md").read_text() == "mine" and (out / META_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_fit_into_a_finished_run_is_refused_before_any_work_and_overwrite_keeps_the_users_files(tiny_fitted, tmp_path):
    clf, images = tiny_fitted
    out = clf.save(tmp_path / "run")
    files = users_files(out)
    refused = run_cli("fit", str(tmp_path / "no such data"), "--out", str(out), *TINY_FIT, check=False)
    # refused on OUT before DATA is even looked at (the data does not exist)
    assert refused.returncode == 2, refused.stderr
    assert f"{out} holds a finished run" in refused.stderr and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    run_cli("fit", str(images), "--out", str(out), "--overwrite", *TINY_FIT)
    assert {name: (out / name).read_text() for name in files} == files
    assert (out / "model.safetensors").is_file() and not lock_file(out).exists()


def test_check_out_dir_says_where_an_unfinished_fit_stands_never_epoch_0(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.json"
    last.write_text('{"phase": "finetune", "epoch": 0, "phase_epochs": 5}')
    with pytest.raises(UsageError, match="before the first epoch of finetune") as info:
        check_out_dir(tmp_path, overwrite=False)
    assert "epoch 0" not in str(info.value)
    last.write_text('{"phase": "finetune", "epoch": 2, "phase_epochs": 5}')
    with pytest.raises(UsageError, match="phase finetune, epoch 2 of 5"):
        check_out_dir(tmp_path, overwrite=False)


@pytest.mark.slow
def test_a_resumed_fit_says_from_which_phase_and_epoch(tmp_path, caplog):
    images = write_folder(tmp_path / "colours", per_class=6)
    settings = dict(strategy="finetune:last=1", image_size=32, batch_size=8, precision="fp32", checkpoint_dir=tmp_path / "ck")
    ImageClassifier("builtin:efficientnet_lite0", epochs=1, **settings).fit(images)
    with caplog.at_level(logging.INFO, logger="transferkit"):
        ImageClassifier("builtin:efficientnet_lite0", epochs=2, resume=True, **settings).fit(images)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from checkpoint"))
    assert str(tmp_path / "ck" / "last.pt") in line and "phase finetune, epoch 1 of 2" in line


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_second_fit_into_the_same_folder_is_refused_while_the_first_runs(tiny_fitted, tmp_path):
    _, images = tiny_fitted
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "transferkit", "fit", str(images), "--out", str(out), *TINY_FIT]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock, deadline = lock_file(out), time.monotonic() + TIMEOUT
    try:
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first fit never took the lock"
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGSTOP)  # the first fit holds OUT, frozen mid-fit: deterministic, however slow
        second = run_cli("fit", str(images), "--out", str(out), "--overwrite", *TINY_FIT, check=False)
        assert second.returncode == 1, second.stderr
        assert f"{out} is being written by another transferkit process (pid {first.pid})" in second.stderr
        assert "--out" in second.stderr and "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err
    assert (out / META_FILE).is_file() and not lock.exists()
