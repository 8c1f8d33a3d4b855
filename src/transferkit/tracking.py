"""Experiment tracking: a fit's settings, per-epoch metrics, results and report, logged to TensorBoard or MLflow.

Off by default. `--log tensorboard|mlflow` (or ``ImageClassifier(tracker=...)``)
opens a run and `fit` logs into it as it goes: its settings when it starts, each
history row as its epoch ends (step = the row's index over every phase of the
fit; the metric is named ``<phase>/<column>``, e.g. ``finetune/val_acc``), the
resolved strategy and the test metrics when it ends; the caller then attaches the
report. Both backends receive the same names and values. The libraries are
imported only when a tracker starts: they are the ``log`` extra
(``pip install "transferkit[log]"``).

Where logs go:
  tensorboard  ``ROOT/<run name>/``: event files, the report copied beside them.
               ROOT is ``--log-to``, else ``OUT/tensorboard``.
  mlflow       ``--log-to URI``, else ``$MLFLOW_TRACKING_URI``, else
               ``sqlite:///OUT/mlflow.db`` with artifacts in ``OUT/mlartifacts``.
               Experiment ``$MLFLOW_EXPERIMENT_NAME``, else ``transferkit``.

Example:
    >>> with open_run("mlflow", out="runs/plants", run_name="plants") as run:   # doctest: +SKIP
    ...     clf = ImageClassifier(strategy="lp-ft", tracker=run).fit("data/plants")
    ...     clf.save("runs/plants")
    ...     log_fit_report(run, clf, "runs/plants")
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from transferkit.errors import TrackingError, UsageError, did_you_mean
from transferkit.runs.meta import RunMeta

TRACKERS = ("tensorboard", "mlflow")
INSTALL = 'pip install "transferkit[log]"'
EXPERIMENT = "transferkit"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
PARAMS_PER_BATCH = 100  # MLflow's limit on parameters in one log_batch call

ParamValue = str | int | float | bool


# --------------------------------------------------------------------------- the interface


class Tracker:
    """One run of an experiment tracker. This base class writes nothing (logging off, or not rank 0).

    Subclasses write through `_start`, `_write_params`, `_write_metrics`, `_write_report` and `_end`; the
    public methods normalise what they get, so every backend receives the same names and values.
    As a context manager the run ends FINISHED, or FAILED when the block raises (KILLED on Ctrl-C).
    """

    backend = "off"

    def __init__(self) -> None:
        self.run_name = ""
        self.params: dict[str, ParamValue] = {}
        self.results: dict[str, float] = {}  # metrics of the whole run (logged with step=None)
        self.last_step = 0
        self.status: str | None = None  # set when the run has ended

    def start(self, run_name: str) -> Tracker:
        self.run_name = run_name
        self._start(run_name)
        return self

    def child(self, run_name: str) -> Tracker:
        """A started run nested under this one (compare: one per strategy)."""
        return Tracker().start(run_name)

    def log_params(self, params: dict) -> None:
        """Settings, flattened to ``a.b`` keys with plain values; each key is logged once."""
        flat = flatten_params(params)
        self.params.update(flat)
        self._write_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numbers at `step` (an epoch of a series), or results of the whole run with step None (at the last step)."""
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}  # numpy scalars too
        if step is None:
            self.results.update(values)
            step = self.last_step
        self.last_step = max(self.last_step, step)
        self._write_metrics(values, step)

    def log_report(self, files: Sequence[str | Path], summary: str) -> None:
        """Attach report files (MLflow artifacts; copied into the TensorBoard run folder) and a markdown summary."""
        self._write_report([Path(f) for f in files if Path(f).is_file()], summary)

    def end(self, status: str = "FINISHED") -> None:
        if self.status is None:
            self.status = status
            self._end(status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, tb) -> None:
        interrupted = isinstance(error, KeyboardInterrupt) or isinstance(getattr(error, "__context__", None), KeyboardInterrupt)
        self.end("FINISHED" if error is None else "KILLED" if interrupted else "FAILED")

    def _start(self, run_name: str) -> None:
        pass

    def _write_params(self, params: dict[str, ParamValue]) -> None:
        pass

    def _write_metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def _write_report(self, files: list[Path], summary: str) -> None:
        pass

    def _end(self, status: str) -> None:
        pass


def flatten_params(params: dict, prefix: str = "") -> dict[str, ParamValue]:
    """Nested dicts become ``a.b`` keys; None, lists and other values become text both backends accept."""
    flat: dict[str, ParamValue] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value[:MAX_PARAM_CHARS] if isinstance(value, str) else value
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, default=str)[:MAX_PARAM_CHARS]
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def markdown_table(params: dict[str, ParamValue]) -> str:
    return "| parameter | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in params.items())


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker(Tracker):
    """Event files through torch's SummaryWriter: scalars per metric, params and summary as text, hparams at the end.

    Each run is a folder under `root`; a name already holding event files gets ``-2``, ``-3``, ...,
    so a second fit into the same root is a second run in TensorBoard, not a mix of two.
    """

    backend = "tensorboard"

    def __init__(self, root: str | Path):
        super().__init__()
        self.root = Path(root)
        self._text_step = 0

    def _start(self, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = fresh_run_dir(self.root, run_name)
        self.writer = SummaryWriter(str(self.log_dir))

    def child(self, run_name: str) -> Tracker:
        return TensorBoardTracker(self.log_dir).start(run_name)

    def _write_params(self, params: dict[str, ParamValue]) -> None:
        self.writer.add_text("params", markdown_table(params), self._text_step)
        self._text_step += 1
        self.writer.flush()

    def _write_metrics(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # SummaryWriter flushes every 2 minutes on its own: show each epoch as it ends

    def _write_report(self, files: list[Path], summary: str) -> None:
        for f in files:
            shutil.copy2(f, self.log_dir / f.name)
        self.writer.add_text("summary", summary, 0)
        self.writer.flush()

    def _end(self, status: str) -> None:
        if self.results:  # the HPARAMS tab: this run's settings against its results, beside the other runs'
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(self.params, self.results):
                self.writer._get_file_writer().add_summary(summary)  # add_hparams would write a sub-folder run
        self.writer.add_text("status", status, 0)
        self.writer.close()


def fresh_run_dir(root: Path, run_name: str) -> Path:
    """``root/<run name>`` made safe as a folder name; suffixed ``-2``, ``-3`` while that folder already has events."""
    safe = re.sub(r"[^\w.=@+-]+", "_", run_name).strip("_") or "run"
    folder, n = root / safe, 2
    while folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
        folder, n = root / f"{safe}-{n}", n + 1
    return folder


# --------------------------------------------------------------------------- MLflow


class MLflowTracker(Tracker):
    """A run in an MLflow tracking store through `MlflowClient` (no global active run, so runs can nest).

    The default store is SQLite (``sqlite:///OUT/mlflow.db``), not the ``./mlruns`` folder:
    MLflow 3 keeps the folder store in maintenance mode and refuses it unless
    MLFLOW_ALLOW_FILE_STORE=true, while SQLite is the backend it recommends, and needs only
    SQLAlchemy and Alembic beside mlflow-skinny (the ``log`` extra), not the full mlflow
    package with its server, pandas and pyarrow.
    """

    backend = "mlflow"

    def __init__(self, uri: str, *, experiment: str = EXPERIMENT, parent_id: str | None = None, client=None):
        super().__init__()
        self.uri, self.experiment, self.parent_id, self.client = uri, experiment, parent_id, client

    def _start(self, run_name: str) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            self.client = self.client or MlflowClient(self.uri)
            tags = {"mlflow.parentRunId": self.parent_id} if self.parent_id else {}
            self.run_id = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags).info.run_id
        except MlflowException as e:
            raise TrackingError(
                f"MLflow refused tracking URI {self.uri!r}: {e.message[:500]} Use a database URI such as "
                "sqlite:///PATH/mlflow.db (--log-to or MLFLOW_TRACKING_URI), or set "
                "MLFLOW_ALLOW_FILE_STORE=true to keep a ./mlruns folder store."
            ) from e

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=sqlite_artifact_root(self.uri))

    def child(self, run_name: str) -> Tracker:
        return MLflowTracker(self.uri, experiment=self.experiment, parent_id=self.run_id, client=self.client).start(run_name)

    def _write_params(self, params: dict[str, ParamValue]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def _write_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now_ms, step) for k, v in values.items()])

    def _write_report(self, files: list[Path], summary: str) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        self.client.log_text(self.run_id, summary, "summary.md")

    def _end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def sqlite_artifact_root(uri: str) -> str | None:
    """Artifacts of a new experiment in a local SQLite store go beside the database file.

    MLflow's own default for a database store is ./mlruns in the current folder, wherever that is.
    """
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


# --------------------------------------------------------------------------- opening a run


def _require(backend: str, modules: Sequence[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TrackingError(
            f"--log {backend} needs the Python package(s) {', '.join(missing)}, which are not installed. Install the log extra: {INSTALL}"
        )


def create_tracker(backend: str, *, out: str | Path, to: str | None = None) -> Tracker:
    """A tracker for `backend` ('tensorboard' or 'mlflow'), not started.

    Args:
        out: the run (or compare) directory: default home of the logs.
        to: a TensorBoard root folder, or an MLflow tracking URI; None takes the default (module docstring).

    Raises:
        UsageError: an unknown backend. TrackingError: its library is not installed.
    """
    if backend not in TRACKERS:
        raise UsageError(f"--log must be one of {', '.join(TRACKERS)}; got '{backend}'.{did_you_mean(backend, TRACKERS)}")
    from transferkit.distributed import is_main

    if not is_main():  # in a torchrun group only rank 0 logs; the others get a tracker that writes nothing
        return Tracker()
    if backend == "tensorboard":
        _require(backend, ("tensorboard",))
        return TensorBoardTracker(Path(to) if to else Path(out) / "tensorboard")
    uri = to or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"
    # mlflow is mlflow-skinny's (or full mlflow's) package; a database store also needs SQLAlchemy and Alembic.
    _require(backend, ("mlflow", "sqlalchemy", "alembic") if uri.startswith("sqlite") else ("mlflow",))
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MLflowTracker(uri, experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)


def open_run(backend: str | None, *, out: str | Path, run_name: str, to: str | None = None) -> Tracker:
    """A started run of `backend`; with backend None, a tracker that logs nothing (logging is off)."""
    if backend is None:
        if to is not None:
            raise UsageError(f"--log-to {to} says where logs go, but logging is off. Add --log tensorboard or --log mlflow.")
        return Tracker().start(run_name)
    return create_tracker(backend, out=out, to=to).start(run_name)


# --------------------------------------------------------------------------- what a fit logs


class FitLog:
    """What a fit logs: its settings first, each history row as its epoch ends, results last (all plain dicts).

    Rows can be offered more than once (live at each epoch end, again when their phase ends): each is
    logged once, at the next step, so the steps count epochs over every phase of the fit.
    """

    def __init__(self, tracker: Tracker | None):
        self.tracker = tracker
        self.step = 0
        self._logged: dict[int, dict] = {}  # id(row) -> row; holding the rows keeps their ids unique

    def start(self, settings: dict) -> None:
        if self.tracker is not None:
            self.tracker.log_params(settings)

    def epochs(self, rows: list[dict]) -> None:
        """Log the history rows not logged yet, in order."""
        if self.tracker is None:
            return
        for row in rows:
            if id(row) in self._logged:
                continue
            self._logged[id(row)] = row
            self.step += 1
            phase = row.get("phase", "train")
            self.tracker.log_metrics({f"{phase}/{k}": v for k, v in row.items() if k not in ("phase", "epoch")}, self.step)

    def end(self, meta: RunMeta) -> None:
        """`meta`: the fitted run's record."""
        if self.tracker is None:
            return
        self.tracker.log_params(
            {
                "strategy": meta.strategy.spec,
                "auto": meta.strategy.auto or "not used",
                "feature_cache": meta.feature_cache or "not used",
            }
        )
        self.tracker.log_metrics(fit_results(meta.metrics))


def fit_results(metrics: dict) -> dict[str, float]:
    """The numbers a fit ends with, under the names both backends log them as."""
    test = metrics["test"]
    results = {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_top5_accuracy": test.get("top5_accuracy"),  # None with 5 classes or fewer: not logged
        "val_accuracy": metrics["val_accuracy"],
        "train_seconds": metrics["train_seconds"],
    }
    return {k: v for k, v in results.items() if v is not None}


def fit_summary(meta: RunMeta) -> str:
    """A markdown summary of a fit (TensorBoard's text tab, MLflow's summary.md), from its record."""
    m, sizes = meta.metrics, meta.metrics["split_sizes"]
    noun = "texts" if meta.modality == "text" else "images"
    lines = [
        f"# transferkit fit: {meta.strategy.spec} on {meta.backbone_name}",
        "",
        f"Test accuracy **{m['test']['accuracy']:.4f}**, macro-F1 {m['test']['macro_f1']:.4f}, "
        f"val accuracy {m['val_accuracy']:.4f}, {m['train_seconds']:.1f} s.",
        "",
        f"Data: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test {noun}, {len(meta.classes)} classes.",
    ]
    auto = meta.strategy.auto
    if auto:
        lines += ["", f"auto chose {auto['chosen']}: {auto['reason']}"]
    return "\n".join(lines) + "\n"


REPORT_FILES = ("report.html", "metrics.json", "transferkit.json")


def log_fit_report(tracker: Tracker, meta: RunMeta, run_dir: str | Path) -> None:
    """After the run is saved to `run_dir`: attach its report, metrics and manifest, and the summary."""
    tracker.log_report([Path(run_dir) / name for name in REPORT_FILES], fit_summary(meta))


# --------------------------------------------------------------------------- what compare logs


def log_strategy_result(tracker: Tracker, row: dict) -> None:
    """What compare measures beyond the fit itself (a StrategyResult's row), in that strategy's run."""
    tracker.log_metrics({k: row[k] for k in ("seconds", "peak_memory_mib", "trainable_params", "trainable_share")})


def log_comparison(tracker: Tracker, comparison: dict, paths: dict[str, Path]) -> None:
    """The parent run of a compare (its compare.json content): settings, the winner, and the reports written."""
    results = comparison["results"]
    best = next(r for r in results if r["strategy"] == comparison["winner"])
    tracker.log_params(
        {
            "data": comparison["data"],
            "model": comparison["model"],
            "seed": comparison["seed"],
            "strategies": [r["strategy"] for r in results],
            "split_sizes": comparison["split_sizes"],
            "winner": comparison["winner"],
        }
    )
    tracker.log_metrics({"best_test_accuracy": best["test_accuracy"], "best_macro_f1": best["macro_f1"]})
    tracker.log_report(list(paths.values()), paths["markdown"].read_text(encoding="utf-8"))
