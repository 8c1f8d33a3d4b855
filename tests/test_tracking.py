"""Experiment logging, read back with TensorBoard's and MLflow's own readers."""

import importlib.util
import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from typer.testing import CliRunner

from conftest import invoke_cli, write_folder
from transferkit import ImageClassifier, UsageError
from transferkit.cli.app import app
from transferkit.errors import TrackingError
from transferkit.tracking import TensorBoardTracker, create_tracker, log_fit_report, open_run

TINY = ("--image-size", "32", "--batch-size", "8", "-q")
# MLflow 3.17's SQLite store uses an SQLAlchemy 2.1 loader option that SQLAlchemy deprecates; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def read_events(folder) -> EventAccumulator:
    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def texts(events: EventAccumulator, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]


def mlflow_runs(uri: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("transferkit")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_fit_logs_to_tensorboard_live_per_epoch(image_folder, tmp_path):
    out = tmp_path / "plants"
    invoke_cli("fit", str(image_folder), "--strategy", "finetune:last=1", "--epochs", "2", "--out", str(out), *TINY, "--log", "tensorboard")
    meta = json.loads((out / "transferkit.json").read_text())
    runs = list((out / "tensorboard").iterdir())
    assert [r.name for r in runs] == ["plants-finetune_last=1"]
    events = read_events(runs[0])
    phases = meta["strategy"]["phases"]
    assert [p["name"] for p in phases] == ["head", "finetune"] and phases[1]["epochs_run"] == 2
    steps = []
    for p in phases:  # one point per epoch run (per C tried, for the L-BFGS probe), steps counting over phases
        points = events.Scalars(f"{p['name']}/val_acc")
        assert len(points) == p["epochs_run"]
        steps += [e.step for e in points]
    assert steps == list(range(1, len(steps) + 1))
    assert {"finetune/train_loss", "finetune/lr", "head/C"} <= set(events.Tags()["scalars"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert events.Scalars("test_accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert events.Scalars("test_macro_f1")[-1].value == pytest.approx(metrics["test"]["macro_f1"], abs=1e-6)
    started, ended = texts(events, "params")
    assert "| strategy_requested | finetune:last=1 |" in started and "| epochs | 2 |" in started
    assert "| data.train | 24 |" in started and "| strategy | finetune:last=1 |" in ended
    assert f"{metrics['test']['accuracy']:.4f}" in texts(events, "summary")[0]
    assert texts(events, "status") == ["FINISHED"]
    assert (runs[0] / "report.html").read_bytes() == (out / "report.html").read_bytes()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["strategy"].string_value == "finetune:last=1" and hparams["epochs"].number_value == 2


def test_compare_logs_one_mlflow_run_per_strategy_under_a_parent(tmp_path):
    data = write_folder(tmp_path / "colours", per_class=10)
    out = tmp_path / "cmp"
    invoke_cli(
        "compare",
        str(data),
        "--strategies",
        "feature-extraction,finetune:last=1",
        "--epochs",
        "1",
        "--out",
        str(out),
        *TINY,
        "--log",
        "mlflow",
        cwd=tmp_path,
    )
    client, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    parent, *children = runs
    assert parent.info.run_name == "cmp-compare" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "report.html",
        "report.md",
        "compare.json",
        "summary.md",
        "doctor.html",
    }
    results = {r["strategy"]: r for r in json.loads((out / "compare.json").read_text())["results"]}
    assert [c.info.run_name for c in children] == list(results)
    assert parent.data.params["winner"] in results
    for child in children:
        result = results[child.info.run_name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert child.data.params["strategy"] == child.info.run_name
        assert child.data.metrics["test_accuracy"] == result["test_accuracy"]
        assert child.data.metrics["trainable_params"] == result["trainable_params"]
        for phase in result["phases"]:
            history = client.get_metric_history(child.info.run_id, f"{phase['name']}/val_acc")
            assert len(history) == phase["epochs_run"]
    assert not (tmp_path / "mlruns").exists()  # artifacts beside the database, not in the working folder


def test_python_api_logs_to_mlflow_tracking_uri_and_marks_failures(image_folder, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    with open_run("mlflow", out=out, run_name="api") as run:
        clf = ImageClassifier(strategy="feature-extraction", image_size=32, progress=False, tracker=run).fit(image_folder)
        clf.save(out)
        log_fit_report(run, clf.run_meta(), out)
    with pytest.raises(UsageError), open_run("mlflow", out=out, run_name="broken") as run:
        ImageClassifier(strategy="finetune:lst=1", tracker=run).fit(image_folder)
    assert not (out / "mlflow.db").exists()  # MLFLOW_TRACKING_URI wins over the default under OUT
    client, (done, broken) = mlflow_runs(uri)
    assert (done.info.status, broken.info.status) == ("FINISHED", "FAILED")
    metrics = json.loads((out / "metrics.json").read_text())
    assert done.data.metrics["test_accuracy"] == metrics["test"]["accuracy"]
    assert done.data.metrics["train_seconds"] == metrics["train_seconds"]
    assert done.data.params["model"] == "builtin:efficientnet_lite0" and done.data.params["auto"] == "not used"
    assert {a.path for a in client.list_artifacts(done.info.run_id)} == {"report.html", "metrics.json", "transferkit.json", "summary.md"}
    assert (tmp_path / "shared" / "mlartifacts").is_dir()


@pytest.mark.subprocess
def test_without_log_nothing_is_written_and_no_tracking_library_is_imported(image_folder, tmp_path):
    out = tmp_path / "run"
    code = (
        f"import sys\nfrom transferkit.cli.app import app\n"
        f"try:\n    app(['fit', {str(image_folder)!r}, '--strategy', 'feature-extraction', '--out', {str(out)!r}, "
        f"'--image-size', '32', '-q'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard', 'sqlalchemy', 'alembic') "
        "or m.startswith('torch.utils.tensorboard')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "model.safetensors").is_file()
    assert not {"tensorboard", "mlflow.db", "mlartifacts", "mlruns"} & {p.name for p in out.iterdir()}
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()


def test_bad_log_options_and_missing_library_say_how_to_fix(tmp_path, monkeypatch):
    runner = CliRunner()

    def said(result) -> str:  # rich wraps at the terminal width
        return " ".join(result.output.split())

    result = runner.invoke(app, ["fit", "digits", "--log", "tensorbord", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "one of tensorboard, mlflow; got 'tensorbord'. Did you mean: tensorboard?" in said(result)
    result = runner.invoke(app, ["compare", "--log-to", str(tmp_path / "tb"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Add --log tensorboard or --log mlflow" in said(result)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrackingError, match=r"mlflow, which are not installed"):
        create_tracker("mlflow", out=tmp_path)
    result = runner.invoke(app, ["fit", "digits", "--log", "mlflow", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and 'pip install "transferkit[log]"' in said(result)
    assert not (tmp_path / "x").exists()


def test_tensorboard_run_of_the_same_name_gets_its_own_folder(tmp_path):
    for value in (0.5, 0.75):
        with TensorBoardTracker(tmp_path).start("fit") as run:
            run.log_metrics({"val_acc": value}, step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit", "fit-2"]
    assert [e.value for e in read_events(tmp_path / "fit-2").Scalars("val_acc")] == [0.75]
