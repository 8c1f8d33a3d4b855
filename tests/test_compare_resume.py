"""An interrupted compare keeps what finished and continues with --resume (issue 28: 7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, write_folder
from transferkit.errors import UsageError

TIMEOUT = 300


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="CPython can drop a SIGINT raised inside a weakref callback ('Exception ignored in WeakKeyDictionary'); "
    "seen once in CI under load. Open in issue 28 item 7: make the interrupt handling robust.",
)
def test_ctrl_c_keeps_each_finished_strategy_and_resume_runs_the_rest(tmp_path):
    data = write_folder(tmp_path / "colours", per_class=6)
    out = tmp_path / "cmp"
    options = ["--image-size", "32", "--precision", "fp32", "--cv", "0", "--batch-size", "8", "-q", "--out", str(out)]
    args = ["compare", str(data), "--strategies", "feature-extraction,finetune:last=1", *options]
    argv = [sys.executable, "-m", "transferkit", *args, "--epochs", "6"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "report.html").is_file():  # written after compare.json, once the first strategy finished
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no partial report before the comparison ended: {proc.communicate()}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGSTOP)  # hold it mid-comparison, then Ctrl-C: deterministic however fast it runs
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGCONT)
    for _ in range(5):  # Python drops a KeyboardInterrupt that lands in a weakref callback ("Exception ignored"): again
        try:
            proc.wait(timeout=3)  # exiting after a handled Ctrl-C takes a moment: a second one then would cut it
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert "Kept what finished: feature-extraction (1 seed(s))" in err and "--resume" in err
    kept = json.loads((out / "compare.json").read_text())
    assert kept["complete"] is False and kept["pending"] == ["finetune:last=1"]
    assert [r["label"] for r in kept["results"]] == ["feature-extraction"]
    assert "Unfinished" in (out / "report.md").read_text()

    refused = run_cli(*args, "--epochs", "6", check=False)  # without --resume, the unfinished comparison is not overwritten
    assert refused.returncode == 2 and "holds an unfinished comparison" in refused.stderr and "--resume" in refused.stderr
    other = run_cli(*args, "--epochs", "7", "--resume", check=False)
    assert other.returncode == 2 and "settings.epochs: 6 in compare.json, 7 now" in other.stderr, other.stderr

    run_cli(*args, "--epochs", "6", "--resume")
    done = json.loads((out / "compare.json").read_text())
    assert done["complete"] is True and [r["label"] for r in done["results"]] == ["feature-extraction", "finetune:last=1"]
    assert done["results"][0]["runs"] == kept["results"][0]["runs"]  # kept, not trained again
    assert done["results"][0]["seconds"] == kept["results"][0]["seconds"]


@pytest.mark.slow
def test_each_finished_seed_is_kept_and_resume_trains_only_the_others(tmp_path):
    from transferkit.compare.run import compare
    from transferkit.data import load_image_data

    splits = load_image_data(write_folder(tmp_path / "colours", per_class=6), split=(0.5, 0.25, 0.25), seed=0)
    options = dict(data_name="colours", strategies=["feature-extraction"], seeds=2, cv=0, settings={"image_size": 32, "precision": "fp32"})
    written = []

    def ctrl_c_after_the_first_seed(partial):
        written.append(json.loads(json.dumps(partial.to_dict(), default=str)))
        raise KeyboardInterrupt  # as Ctrl-C right after the first seed was written

    with pytest.raises(KeyboardInterrupt):
        compare(splits, on_partial=ctrl_c_after_the_first_seed, **options)
    kept = written[-1]
    assert kept["complete"] is False and kept["pending"] == ["feature-extraction"] and len(kept["results"][0]["runs"]) == 1
    done = compare(splits, resume_from=kept, **options)
    assert [run["seed"] for run in done.results[0].runs] == [0, 1]
    assert done.results[0].runs[0] == kept["results"][0]["runs"][0]  # the first seed kept, not trained again
    with pytest.raises(UsageError, match=r"seeds: 2 in compare\.json, 3 now"):
        compare(splits, resume_from=kept, **{**options, "seeds": 3})
