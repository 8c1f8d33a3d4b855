"""The run directory: save and load a trained model with everything needed to use it.

::

    runs/plants/
      model.safetensors   image runs: the full state dict in timm's own names (plain timm loads it)
      encoder/ head.safetensors   text runs: transformers' own format (see transferkit.backbones.text)
      transferkit.json    format version, modality, backbone, classes, data config, strategy,
                          decisions, training config, metrics, history, library versions
      config.json         image runs: timm's hub config (timm.create_model("local-dir:RUN", pretrained=True))
      README.md           the model card, in the Hub's format (transferkit.runs.hubfiles)
      metrics.json  history.csv  report.html
      checkpoints/        last, for --resume

The model is written through the backbone contract (`write_trained`) and read
back the same way (`read_trained`). Every file is written to a temporary name
and renamed into place, so a run directory never holds a half-written model or
manifest.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from transferkit.atomic import write_history_csv, write_json
from transferkit.backbones import read_trained
from transferkit.backbones.base import Backbone
from transferkit.backbones.names import LEGACY_NAMES
from transferkit.errors import RunError
from transferkit.report.fit import write_fit_report
from transferkit.runs.hubfiles import write_hub_files
from transferkit.runs.meta import FORMAT_VERSION, RunMeta

REQUIRED_FIELDS = {"format_version": int, "backbone": dict, "classes": list, "data_config": dict, "strategy": dict}
META_FILE = "transferkit.json"
# Written into a run directory during the fit, not by the save: kept when the saved run replaces the folder.
CARRIED = ("checkpoints", "tensorboard", "mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlartifacts")
# What a save writes (any modality, any version): the files a later save replaces. Everything else in a run
# folder (the user's notes, photos, a git repository, exports) is the user's and is never deleted.
RUN_FILES = (
    META_FILE,
    "model.safetensors",
    "config.json",
    "README.md",
    "metrics.json",
    "history.csv",
    "report.html",
    "confusion.png",
    "curves.png",
    "doctor.html",
    "issues.csv",
    "doctor.json",
    "encoder",
    "head.safetensors",
    "adapter",
)
# What `transferkit export` writes into a run: kept too (the user asked for it), with a warning that it holds the old model.
EXPORTS = ("model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json", "model.torchscript.pt", "model.torchscript.pt.json")
log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    """The versions that produced a run (installed distributions; absent ones are left out)."""
    out = {}
    for name in ("transferkit", "torch", "torchvision", "timm", "numpy", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out | {"python": platform.python_version()}


def save_run(out: Path, backbone: Backbone, meta: RunMeta, report_extras: dict | None = None, *, overwrite: bool = True) -> None:
    """Write a run directory as a unit: built beside `out`, then swapped in; the user's files in `out` are kept.

    Everything (model through the backbone contract, metadata, metrics, history, report; the manifest last)
    is written into a staging folder next to `out`, the fit's checkpoints and experiment logs are hard-linked into it
    (`CARRIED`), and only then does it replace `out` by two renames, after which every file of the old folder that
    a save did not write (not in `RUN_FILES` or `CARRIED`: the user's notes, photos, exports) is moved back in. A
    save cut short (kill -9) leaves `out` as it was (an earlier run, or the checkpoints that `--resume` finishes
    from) and a staging folder that the next save removes (putting back any user file the cut left there); a
    reader never sees a new model beside an old manifest or files of two runs mixed. The run folder's lock
    (:mod:`transferkit.runs.lock`) is held throughout.

    Args:
        overwrite: replace a finished run in `out`; False refuses (UsageError) and leaves it as it is. The estimator's
            `save` and the CLI pass False unless asked (``--overwrite``); True here, as a library primitive.
    """
    from transferkit.runs.lock import run_folder_lock

    out = Path(out)
    with run_folder_lock(out, "save"):
        check_out_dir(out, overwrite=overwrite)
        recover_interrupted_save(out)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.saving-"))
        try:
            _write_run_files(stage, backbone, meta, out.name, report_extras)
            _link_carried(out, stage)
            replaced = read_meta_or_none(out)
            _swap_in(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    if replaced is not None:
        log.info(
            "Replaced the previous run in %s (%s, %s); files it did not write were kept.",
            out,
            replaced.strategy.spec,
            replaced.backbone_name,
        )


def _write_run_files(stage: Path, backbone: Backbone, meta: RunMeta, name: str, report_extras: dict | None = None) -> None:
    backbone.write_trained(stage)
    manifest = meta.with_(format_version=FORMAT_VERSION, versions=library_versions())
    if meta.history:
        write_history_csv(stage / "history.csv", meta.history)
    if meta.metrics:
        write_json(stage / "metrics.json", meta.metrics)
    if meta.test_metrics:
        write_fit_report(stage, meta, report_extras)
    write_hub_files(stage, backbone, manifest, name)  # timm's config.json, the model card
    write_json(stage / META_FILE, manifest.to_dict())


def _link_carried(out: Path, stage: Path) -> None:
    """What this fit wrote into `out` before the save (checkpoints, experiment logs) carries over into the new run.

    Hard links: instant, the originals stay until the swap, and a logger that appends to its file by path
    (TensorBoard) keeps writing to the same file afterwards.
    """
    for name in CARRIED:
        source = out / name
        if source.is_file():
            _link(source, stage / name)
        elif source.is_dir():
            for f in source.rglob("*"):
                if f.is_file() and not f.name.endswith(".tmp"):
                    (stage / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
                    _link(f, stage / f.relative_to(out))


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _swap_in(stage: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
        os.replace(stage, out)
        _keep_users_files(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def _keep_users_files(previous: Path, out: Path) -> None:
    """Move back into `out` what the replaced folder held that no save wrote (renames: instant, same file system)."""
    for entry in sorted(previous.iterdir()):
        if entry.name in RUN_FILES or entry.name in CARRIED or (out / entry.name).exists():
            continue
        os.replace(entry, out / entry.name)
        if entry.name in EXPORTS and not entry.name.endswith(".json"):
            log.warning(
                "Kept %s: it was exported from the replaced run, so it holds the old model. Export again "
                "(transferkit export %s) to match the new one.",
                out / entry.name,
                out,
            )


def recover_interrupted_save(out: Path) -> None:
    """Staging and replaced folders left beside `out` by a save that was killed; what they hold of the user's goes
    back into `out` (a save killed between its two renames leaves the whole previous folder there: it is put back).

    Call it holding the folder's lock (:func:`transferkit.runs.lock.run_folder_lock`): a save in progress has
    such folders too."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        if not p.is_dir():
            continue
        if p.name.startswith(f".{out.name}.old-"):
            previous = p / out.name
            if previous.is_dir() and not out.exists():
                os.replace(previous, out)
            elif previous.is_dir():
                _keep_users_files(previous, out)
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{out.name}.saving-"):
            shutil.rmtree(p, ignore_errors=True)


def read_meta_or_none(run_dir: Path) -> RunMeta | None:
    """The record of the run in `run_dir`, or None where there is none (or it cannot be read), without checks."""
    try:
        return RunMeta.from_dict(json.loads((run_dir / META_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_out_dir(path: Path, *, resume: bool = False, overwrite: bool = True) -> None:
    """Before any work: `path` can take a run directory.

    Raises:
        RunError: `path` is a file or unwritable, or a non-empty folder that is not a transferkit run.
        UsageError: (with overwrite=False) it holds a finished run, or an unfinished fit's checkpoint, and neither
            `resume` nor `overwrite` was asked for.
    """
    from transferkit.errors import UsageError
    from transferkit.training.checkpoints import checkpoint_position

    check_writable_dir(path)
    if not path.is_dir():
        return
    checkpoint = path / "checkpoints" / "last.json"
    others = [p for p in path.iterdir() if not p.name.startswith(".") and p.name not in CARRIED]
    if others and not (path / META_FILE).is_file():
        raise RunError(
            f"{path} is a folder with other files in it ({others[0].name}, ...), not a transferkit run; writing "
            "a run there would mix its files with yours. Choose a new or empty folder with --out."
        )
    if overwrite or resume:
        return
    if (path / META_FILE).is_file():
        old = read_meta_or_none(path)
        what = f" ({old.strategy.spec}, {old.backbone_name})" if old is not None else ""
        raise UsageError(
            f"{path} holds a finished run{what}. Replace it with --overwrite (in Python: save(path, "
            "overwrite=True); files transferkit did not write stay), or choose another folder with --out."
        )
    if not checkpoint.is_file():
        return
    try:
        state = json.loads(checkpoint.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if state.get("phase") != "done":
        raise UsageError(
            f"{path} holds an unfinished fit (checkpoint {checkpoint_position(state)}). Continue it with "
            "--resume, or start over with --overwrite."
        )


def check_writable_dir(path: Path) -> None:
    """Fail early, before any training, when a run directory cannot be written at `path`.

    Nothing is created: a temporary file is opened (and vanishes) in `path` or
    its nearest existing parent, where the run directory would be made.

    Raises:
        RunError: `path` is a file, lies under a file, or its folder refuses writes.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"Cannot write a run directory at {path}: it is a file. Choose another folder with --out.")
    existing = path
    while not existing.exists():  # also False below a file (ENOTDIR)
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"Cannot create run directory {path}: {existing} is a file, not a folder. Choose another folder with --out.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RunError(
            f"Cannot write run directory {path}: {existing} does not accept new files ({e.strerror}). "
            "Choose a folder you can write to with --out."
        ) from e


def validate_meta(meta: object, where: Path) -> dict:
    """Check a transferkit.json: a mapping, a known format version and the required fields with their types.

    What loading reads from the file is checked here, so a damaged or hand-edited file
    gives a RunError rather than a failure further in.
    """
    from transferkit.errors import UsageError
    from transferkit.training.strategies import parse_strategy

    if not isinstance(meta, dict):
        raise RunError(f"{where} is not a JSON object. The run directory is damaged; fit again.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunError(f"{where} has no integer format_version >= 1 (got {version!r}); it was not written by transferkit.")
    if version > FORMAT_VERSION:
        raise RunError(
            f"{where} has format version {version}; this transferkit reads up to {FORMAT_VERSION}. "
            "Upgrade transferkit: pip install -U transferkit"
        )
    for name, typ in REQUIRED_FIELDS.items():
        if not isinstance(meta.get(name), typ):
            raise RunError(
                f"{where} lacks field '{name}' of type {typ.__name__} (got {type(meta.get(name)).__name__}). "
                "The run did not finish or the file was edited; fit again."
            )
    backbone, classes = meta["backbone"], meta["classes"]
    if not isinstance(backbone.get("arch"), str) or not isinstance(backbone.get("name", ""), str):
        raise RunError(f"{where}: backbone.arch (and backbone.name, if given) must be strings; got {backbone!r:.200}.")
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise RunError(f"{where}: classes must be a non-empty list of strings, none repeated; got {classes!r:.200}.")
    size = meta["data_config"].get("input_size", [3, 1, 1])
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise RunError(f"{where}: data_config.input_size must be three positive integers; got {size!r:.200}.")
    spec = meta["strategy"].get("spec", "feature-extraction")
    try:
        parse_strategy(spec)
    except UsageError as e:
        raise RunError(f"{where}: strategy.spec {spec!r:.100} is not a strategy ({e})") from e
    return meta


def read_meta(run_dir: Path) -> RunMeta:
    """The checked record of a finished run (RunError, saying what is wrong and the fix, where it is not one)."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        hint = " (it has checkpoints: finish it with fit --resume)" if (Path(run_dir) / "checkpoints").is_dir() else ""
        raise RunError(f"{run_dir} is not a finished transferkit run: {META_FILE} is missing{hint}.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"Cannot read {path}: {e}. The run directory is damaged; fit again.") from e
    return RunMeta.from_dict(current_names(validate_meta(meta, path)))


def current_names(meta: dict) -> dict:
    """A run saved before the built-ins had their ``builtin:`` names records the built-in Lite0 as
    'efficientnet_lite0'; its weights ("builtin") say which model that was, so it reads as the name it has now,
    without a deprecation message."""
    backbone = meta["backbone"]
    if backbone.get("weights") == "builtin" and backbone.get("name") in LEGACY_NAMES:
        backbone["name"] = LEGACY_NAMES[backbone["name"]]
    return meta


def run_modality(run_dir: str | Path) -> str:
    """'image' or 'text': what a run directory's model classifies."""
    return read_meta(Path(run_dir)).modality


@dataclass
class LoadedRun:
    """A trained backbone ready to predict, with its metadata."""

    backbone: Backbone
    meta: RunMeta

    @property
    def model(self):
        return self.backbone.model

    @property
    def classes(self) -> list[str]:
        return self.meta.classes


def load_run(run_dir: str | Path, expect: str | None = None) -> LoadedRun:
    """Rebuild a run directory's trained model through its backbone type, and its metadata.

    Args:
        expect: 'image' or 'text': a run of the other modality is an error saying what it is.

    Raises:
        RunError: the directory is not a complete run, holds the other modality, or its files do not match.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    modality = meta.modality
    if expect is not None and modality != expect:
        cls = "TextClassifier" if modality == "text" else "ImageClassifier"
        raise RunError(f"{run_dir} holds a {modality} model; load it with {cls}.load (or transferkit.load_classifier).")
    backbone = read_trained(run_dir, modality=modality, spec=meta.backbone, n_classes=len(meta.classes), data_config=meta.data_config)
    return LoadedRun(backbone, meta)
