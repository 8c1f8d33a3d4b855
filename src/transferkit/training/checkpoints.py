"""Checkpoints: everything needed to continue a fit exactly, written atomically after every epoch.

``checkpoints/last.pt`` holds the model, optimizer, scheduler, every RNG state,
phase and epoch; ``last.json`` says where it stands in words. Loaded with
``weights_only=True``: a checkpoint holds tensors and plain values only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from transferkit import distributed
from transferkit.atomic import write_atomic, write_json
from transferkit.errors import RunError, UsageError
from transferkit.training.strategies import DEFAULT_FINETUNE_EPOCHS


@dataclass(frozen=True, kw_only=True)
class ResumeState:
    """Where a fit stands after an epoch: what ``last.pt`` holds besides the run's fingerprint.

    Between phases `loop` is None and `model` holds the weights; inside a phase `loop` holds the loop's state
    (training.loop: model, optimizer, scheduler, RNG states, best weights) and `model` is None.
    """

    phase_index: int  # phases finished: the index of the phase running (len(phases) when done)
    phase: str  # that phase's name, or "done"
    epoch: int  # epochs the running phase finished (0 between phases)
    trainable_blocks: list[str]
    bn: str
    loop: dict[str, Any] | None
    model: dict[str, Any] | None
    final_loop: dict[str, Any] | None = None  # the last phase's last epoch: what --epochs N extends a finished fit from
    results: list[dict[str, Any]]  # the finished phases' PhaseResult fields
    notes: dict[str, dict[str, Any]]  # each phase's notes (the PhaseRecord fields beyond its result)
    extend: tuple[int, int] | None = None  # (epochs before, epochs now): resumed with a larger --epochs; never saved
    phase_epochs: int | None = None  # epochs the running phase is planned for (None in checkpoints written before it)

    def to_dict(self) -> dict[str, Any]:
        """What torch.save writes (plain values and tensors, so weights_only=True loads it); not copied."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extend"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResumeState:
        """From a loaded checkpoint (one written before final_loop was kept has none)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "extend"})

    def with_(self, **changes: Any) -> ResumeState:
        return replace(self, **changes)


class Checkpoints:
    """`checkpoints/last.pt`: everything needed to continue a fit exactly, written atomically each epoch.

    Loaded with weights_only=True: a checkpoint holds tensors and plain values only.
    """

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder, self.fingerprint = folder, fingerprint

    @property
    def path(self) -> Path:
        return self.folder / "last.pt"

    def write(self, state: ResumeState) -> None:
        """Write `state` (rank 0 only: every process holds the same state, nothing in it depends on their number)."""
        if not distributed.is_main():
            return
        buf = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, **state.to_dict()}, buf)
        write_atomic(self.path, buf.getvalue())
        where = {
            "phase_index": state.phase_index,
            "phase": state.phase,
            "epoch": state.epoch,
            "phase_epochs": state.phase_epochs,
            "trainable_blocks": state.trainable_blocks,
        }
        write_json(self.folder / "last.json", where)

    def read(self) -> ResumeState:
        if not self.path.is_file():
            raise UsageError(f"--resume found no checkpoint at {self.path}. Run fit without --resume to start.")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling, truncated file
            raise RunError(f"Checkpoint {self.path} cannot be read ({e}); delete it and fit without --resume.") from e
        saved = state.get("fingerprint") or {}
        if saved != self.fingerprint:
            more = _more_epochs(saved, self.fingerprint)
            if more is None:
                diff = "; ".join(fingerprint_diff(saved, self.fingerprint))
                raise UsageError(
                    f"Checkpoint {self.path} was written for a different run ({diff}). Resume with the "
                    "same data and options (only a larger --epochs may be given, to train longer), or "
                    "fit into another --out without --resume."
                )
            return ResumeState.from_dict(state).with_(extend=more)
        return ResumeState.from_dict(state)

    def exists(self) -> bool:
        return self.path.is_file()


def checkpoint_position(state: dict[str, Any]) -> str:
    """Where a checkpoint stands, in words (`state`: last.json's content, or a ResumeState's fields):
    "phase finetune, epoch 2 of 5", "before the first epoch of finetune", "after the last phase"."""
    phase, epoch, of = state.get("phase", "?"), state.get("epoch"), state.get("phase_epochs")
    if phase == "done":
        return "after the last phase"
    if epoch == 0:
        return f"before the first epoch of {phase}"
    return f"phase {phase}, epoch {epoch if epoch is not None else '?'}" + (f" of {of}" if of else "")


def _more_epochs(saved: dict, now: dict) -> tuple[int, int] | None:
    """(epochs before, epochs now) when the only difference is a larger fine-tuning epoch count, else None.

    `epochs` None is the strategy's default (5), so `--epochs 8` extends a run fitted without `--epochs`.
    """
    before, after = (dict(f, settings={**f.get("settings", {}), "epochs": None}) for f in (saved, now))
    if before != after:
        return None
    old, new = (f.get("settings", {}).get("epochs") or DEFAULT_FINETUNE_EPOCHS for f in (saved, now))
    return (old, new) if new > old else None


def fingerprint_diff(saved: dict, now: dict, prefix: str = "", *, saved_in: str = "the checkpoint") -> list[str]:
    """Each setting that differs, with both values: "epochs: 3 in the checkpoint, 5 now"."""
    out = []
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{key}.", saved_in=saved_in)
        elif a != b:
            name = "the data (its files or their contents)" if key == "data" else f"{prefix}{key}"
            out.append(f"{name}: {a!r} in {saved_in}, {b!r} now" if key != "data" else f"{name} changed")
    return out
