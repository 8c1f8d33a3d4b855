"""The run directory: save and load a trained model with everything needed to use it.

::

    runs/plants/
      model.safetensors   full state dict in timm's own names (plain timm loads it)
      transferkit.json    format version, backbone, classes, data config, strategy,
                          decisions, training config, metrics, library versions
      metrics.json  history.csv
      checkpoints/        last and best, for --resume

Every file is written to a temporary name and renamed into place, so a run
directory never holds a half-written model or manifest.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferkit.errors import RunError

FORMAT_VERSION = 1
REQUIRED_FIELDS = {"format_version": int, "backbone": dict, "classes": list, "data_config": dict, "strategy": dict}
MODEL_FILE, META_FILE = "model.safetensors", "transferkit.json"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_history_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def library_versions() -> dict[str, str]:
    import numpy
    import timm
    import torchvision

    import transferkit

    return {"transferkit": transferkit.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def save_model(out: Path, model: nn.Module) -> None:
    """The full state dict as safetensors (contiguous CPU tensors, timm's own names).

    A model with LoRA adapters is saved merged (plain timm loads it), its adapters beside it in peft's format.
    """
    from safetensors.torch import save

    from transferkit import lora

    if lora.is_adapted(model):
        lora.save_adapters(model, out / lora.ADAPTER_DIR)
        model = lora.merged_copy(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / MODEL_FILE, save(state, metadata={"format": "pt"}))


def save_run(out: Path, model: nn.Module, meta: dict, history: list[dict] | None = None,
             write_model: Callable[[Path, nn.Module], None] | None = None) -> None:
    """Write model (`write_model`, default `save_model`), metadata, metrics, history; the manifest last marks it complete.

    An older manifest is removed first, so a save cut short (kill -9) never leaves a new
    model beside the manifest of the run it replaces; temporary files left by such a cut
    are removed once the save completes.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    (write_model or save_model)(out, model)
    if history:
        write_history_csv(out / "history.csv", history)
    if "metrics" in meta:
        write_json(out / "metrics.json", meta["metrics"])
    write_json(out / META_FILE, {"format_version": FORMAT_VERSION, **meta, "versions": library_versions()})
    for folder in (out, out / "checkpoints"):
        for tmp in folder.glob(".*.tmp"):  # write_atomic's, from a killed process: never read
            tmp.unlink(missing_ok=True)


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
        raise RunError(f"Cannot create run directory {path}: {existing} is a file, not a folder. "
                       "Choose another folder with --out.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RunError(f"Cannot write run directory {path}: {existing} does not accept new files ({e.strerror}). "
                       "Choose a folder you can write to with --out.") from e


def validate_meta(meta: object, where: Path) -> dict:
    """Check a transferkit.json: a mapping, a known format version and the required fields with their types.

    What loading reads from the file is checked here, so a damaged or hand-edited file
    gives a RunError rather than a failure further in.
    """
    from transferkit.errors import UsageError
    from transferkit.strategies import parse_strategy

    if not isinstance(meta, dict):
        raise RunError(f"{where} is not a JSON object. The run directory is damaged; fit again.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunError(f"{where} has no integer format_version >= 1 (got {version!r}); it was not written by transferkit.")
    if version > FORMAT_VERSION:
        raise RunError(f"{where} has format version {version}; this transferkit reads up to {FORMAT_VERSION}. "
                       "Upgrade transferkit: pip install -U transferkit")
    for name, typ in REQUIRED_FIELDS.items():
        if not isinstance(meta.get(name), typ):
            raise RunError(f"{where} lacks field '{name}' of type {typ.__name__} (got {type(meta.get(name)).__name__}). "
                           "The run did not finish or the file was edited; fit again.")
    backbone, classes = meta["backbone"], meta["classes"]
    if not isinstance(backbone.get("arch"), str) or not isinstance(backbone.get("name", ""), str):
        raise RunError(f"{where}: backbone.arch (and backbone.name, if given) must be strings; got {backbone!r:.200}.")
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise RunError(f"{where}: classes must be a non-empty list of strings, none repeated; got {classes!r:.200}.")
    size = meta["data_config"].get("input_size", [3, 1, 1])
    if not (isinstance(size, list) and len(size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise RunError(f"{where}: data_config.input_size must be three positive integers; got {size!r:.200}.")
    spec = meta["strategy"].get("spec", "feature-extraction")
    try:
        parse_strategy(spec)
    except UsageError as e:
        raise RunError(f"{where}: strategy.spec {spec!r:.100} is not a strategy ({e})") from e
    return meta


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        hint = " (it has checkpoints: finish it with fit --resume)" if (Path(run_dir) / "checkpoints").is_dir() else ""
        raise RunError(f"{run_dir} is not a finished transferkit run: {META_FILE} is missing{hint}.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"Cannot read {path}: {e}. The run directory is damaged; fit again.") from e
    return validate_meta(meta, path)


def run_modality(run_dir: str | Path) -> str:
    """'image' or 'text': what a run directory's model classifies."""
    return read_meta(Path(run_dir)).get("modality", "image")


@dataclass
class LoadedRun:
    """A trained model ready to predict, with its metadata."""

    model: nn.Module
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the timm model of a run directory and load its weights (strict).

    Raises:
        RunError: the directory is not a complete run or its files do not match.
    """
    from safetensors.torch import load_file

    from transferkit.backbones import create_for_run

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    model = create_for_run(meta["backbone"]["arch"], len(meta["classes"]))
    try:
        state = load_file(str(run_dir / MODEL_FILE))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # SafetensorError, RuntimeError on mismatch, FileNotFoundError
        raise RunError(f"Cannot load {run_dir / MODEL_FILE}: {str(e)[:300]}. The run directory is damaged; fit again.") from e
    return LoadedRun(model.eval(), meta)
