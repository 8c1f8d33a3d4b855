"""Checkpoints: everything needed to continue a fit exactly, written atomically after every epoch.

``checkpoints/last.pt`` holds the model, optimizer, scheduler, every RNG state,
phase and epoch; ``last.json`` says where it stands in words. Loaded with
``weights_only=True``: a checkpoint holds tensors and plain values only.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from transferkit import distributed
from transferkit.atomic import write_atomic, write_json
from transferkit.errors import RunError, UsageError


class Checkpoints:
    """`checkpoints/last.pt`: everything needed to continue a fit exactly, written atomically each epoch.

    Loaded with weights_only=True: a checkpoint holds tensors and plain values only.
    """

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder, self.fingerprint = folder, fingerprint

    @property
    def path(self) -> Path:
        return self.folder / "last.pt"

    def write(self, state: dict) -> None:
        """Write `state` (rank 0 only: every process holds the same state, nothing in it depends on their number)."""
        if not distributed.is_main():
            return
        buf = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, **state}, buf)
        write_atomic(self.path, buf.getvalue())
        write_json(self.folder / "last.json", {k: state[k] for k in ("phase_index", "phase", "epoch", "trainable_blocks")})

    def read(self) -> dict:
        if not self.path.is_file():
            raise UsageError(f"--resume found no checkpoint at {self.path}. Run fit without --resume to start.")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling, truncated file
            raise RunError(f"Checkpoint {self.path} cannot be read ({e}); delete it and fit without --resume.") from e
        if state.get("fingerprint") != self.fingerprint:
            diff = "; ".join(fingerprint_diff(state.get("fingerprint") or {}, self.fingerprint))
            raise UsageError(f"Checkpoint {self.path} was written for a different run ({diff}). Resume with the same "
                             "data and options, or fit into another --out without --resume.")
        return state

    def exists(self) -> bool:
        return self.path.is_file()


def fingerprint_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Each setting that differs, with both values: "epochs: 3 in the checkpoint, 5 now"."""
    out = []
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            name = "the data (its files or their contents)" if key == "data" else f"{prefix}{key}"
            out.append(f"{name}: {a!r} in the checkpoint, {b!r} now" if key != "data" else f"{name} changed")
    return out
