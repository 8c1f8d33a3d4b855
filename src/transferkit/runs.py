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
    """The full state dict as safetensors (contiguous CPU tensors, timm's own names)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / MODEL_FILE, save(state, metadata={"format": "pt"}))


def save_run(out: Path, model: nn.Module, meta: dict, history: list[dict] | None = None) -> None:
    """Write model, metadata, metrics and history. The manifest goes last: it marks the run complete."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    if history:
        write_history_csv(out / "history.csv", history)
    if "metrics" in meta:
        write_json(out / "metrics.json", meta["metrics"])
    write_json(out / META_FILE, {"format_version": FORMAT_VERSION, **meta, "versions": library_versions()})


def validate_meta(meta: object, where: Path) -> dict:
    """Check a transferkit.json: a mapping, a known format version and the required fields with their types."""
    if not isinstance(meta, dict):
        raise RunError(f"{where} is not a JSON object. The run directory is damaged; fit again.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunError(f"{where} has no integer format_version (got {version!r}); it was not written by transferkit.")
    if version > FORMAT_VERSION:
        raise RunError(f"{where} has format version {version}; this transferkit reads up to {FORMAT_VERSION}. "
                       "Upgrade transferkit: pip install -U transferkit")
    for name, typ in REQUIRED_FIELDS.items():
        if not isinstance(meta.get(name), typ):
            raise RunError(f"{where} lacks field '{name}' of type {typ.__name__} (got {type(meta.get(name)).__name__}). "
                           "The run did not finish or the file was edited; fit again.")
    backbone = meta["backbone"]
    if not isinstance(backbone.get("arch"), str) or not all(isinstance(c, str) for c in meta["classes"]):
        raise RunError(f"{where}: backbone.arch must be a string and classes a list of strings.")
    if len(meta["classes"]) < 1:
        raise RunError(f"{where}: classes is empty.")
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
