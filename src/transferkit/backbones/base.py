"""The backbone contract: one interface for a pretrained network of either modality.

A :class:`Backbone` is a model with a new head for the task, its blocks in order
from the input to the last stage, and its preprocessing. Strategies, the
engine, the feature cache and the run directory use only this interface, so
images and texts differ behind it:

=======================  =========================================================
``model``                an ``nn.Module`` honouring timm's contract:
                         ``forward_features``, ``forward_head(pre_logits=True)``,
                         ``get_classifier``
``blocks``               trainable units in order (timm's ``group_matcher``, or a
                         transformer's layers); ``head_param_names`` the head's
``data_config``          the preprocessing, saved with the run and in cache keys
``dataset(examples)``    a torch Dataset of (input, label, index) for a loader;
                         ``collate`` batches its items (None: default stacking)
``prefix_split(n)``      the frozen part below the top n blocks, or why there is none
``write_trained(out)``   the trained model in the backbone library's own format;
``read_trained(run, ...)`` and back, without downloading anything
=======================  =========================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from transferkit.data.examples import Examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone: its name, architecture and where its weights came from."""

    name: str
    arch: str
    weights: str  # "builtin", "hub", "file:<path>", "dir:<path>" or "none"
    weights_digest: str

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "weights": self.weights, "weights_digest": self.weights_digest}

    @classmethod
    def from_dict(cls, d: dict) -> BackboneSpec:
        """From a run's record (fields an older run lacks read as "")."""
        return cls(**{k: d.get(k, "") for k in ("name", "arch", "weights", "weights_digest")})


@dataclass(frozen=True)
class PrefixSplit:
    """A backbone cut below its top trainable blocks: ``suffix(prefix(x)) == model(x)``.

    Both are torch.fx GraphModules that share the model's own parameters, so
    training `suffix` trains the model. `cut` names the last frozen block.
    """

    prefix: nn.Module
    suffix: nn.Module
    cut: str


@dataclass(frozen=True)
class NoPrefix:
    """Why a backbone's frozen blocks cannot be split off (then frozen-prefix caching is not used)."""

    reason: str


@dataclass(frozen=True)
class Block:
    """One trainable unit of a backbone, in order from the input (stem) to the last stage."""

    name: str
    param_names: tuple[str, ...]


class Backbone:
    """A pretrained model with a head for the task, its ordered blocks and preprocessing (see the module doc).

    Subclasses set `model`, `spec`, `blocks`, `head_param_names`, `data_config`, `load_report`.
    """

    modality: ClassVar[str] = ""  # "image" or "text"
    noun: ClassVar[str] = "examples"  # what the examples are called in messages
    collate: Callable | None = None  # batches dataset items; None stacks them (torch's default)

    model: nn.Module
    spec: BackboneSpec
    blocks: list[Block]
    head_param_names: tuple[str, ...]
    data_config: dict
    load_report: str = ""

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features: what the head sees."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts per block, for the head, and in total."""
        params = dict(self.model.named_parameters())
        counts = {b.name: sum(params[n].numel() for n in b.param_names) for b in self.blocks}
        counts["head"] = sum(params[n].numel() for n in self.head_param_names)
        counts["total"] = sum(p.numel() for p in params.values())
        return counts

    def dataset(self, examples: Examples, augment: str = "none") -> torch.utils.data.Dataset:
        """`examples` as (input, label, index) items; `augment` for training views (images only)."""
        raise NotImplementedError

    def prefix_split(self, top_blocks: int) -> PrefixSplit | NoPrefix:
        """The frozen blocks below the top `top_blocks` as a separate module, or why they cannot be split off."""
        return NoPrefix(f"frozen-prefix caching is not available for {self.modality} backbones")

    def export_refusal(self) -> str | None:
        """Why this backbone's trained model cannot be exported to ONNX/TorchScript, or None when it can."""
        return None

    def write_trained(self, out: Path) -> None:
        """Write the trained model into run directory `out` in the backbone library's own format."""
        raise NotImplementedError

    @classmethod
    def read_trained(cls, run_dir: Path, *, spec: dict, n_classes: int, data_config: dict) -> Backbone:
        """The trained backbone of a run directory (no download): `spec` as BackboneSpec.to_dict() wrote it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What `transferkit inspect` shows: blocks with parameter counts, feature size, input config."""
        counts = self.param_counts()
        return {
            "name": self.spec.name,
            "arch": self.spec.arch,
            "weights": self.spec.weights,
            "modality": self.modality,
            "feature_dim": self.num_features,
            "total_params": counts["total"],
            "blocks": [
                {"index": i, "name": b.name, "params": counts[b.name], "tensors": len(b.param_names)} for i, b in enumerate(self.blocks)
            ],
            "head": {"name": self.head_param_names[0].rsplit(".", 1)[0], "params": counts["head"], "classes": self.num_classes},
            "input": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
        }


def zero_head_(model: nn.Module) -> None:
    """Start the new head at zero: uniform predictions and no saturated softmax.

    timm's ImageNet initialisation (e.g. EfficientNet's uniform(1/sqrt(classes)))
    gives logits of hundreds on pooled features, and the probe then needs many
    times more epochs to reach the same accuracy (0.88 vs 0.95 on digits after 30).
    """
    for p in model.get_classifier().parameters():
        nn.init.zeros_(p)


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file (first 16 hex digits), memoised by (path, size, mtime)."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def block_modules(names: Sequence[str]) -> list[str]:
    """The module paths that hold a group's parameters, one per top-level module: ['blocks.6', 'conv_head', 'bn2']."""
    by_root: dict[str, list[list[str]]] = {}
    for n in names:
        parts = n.split(".")[:-1] or [n]  # drop the parameter's own name (weight, bias)
        by_root.setdefault(parts[0], []).append(parts)
    labels = []
    for paths in by_root.values():
        common = paths[0]
        for p in paths[1:]:
            k = 0
            while k < min(len(common), len(p)) and common[k] == p[k]:
                k += 1
            common = common[:k]
        labels.append(".".join(common))
    return labels


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``, else huggingface.co) cannot be reached, or None when it can.

    One TCP connection with a short timeout, so a machine without network learns it in seconds instead
    of after huggingface_hub's retries with backoff (about 50 s).
    """
    import os
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"
    return None


@dataclass
class HubReach:
    """Whether a hub download may connect: offline by the user's choice, unreachable, or online."""

    offline: bool
    unreachable: str | None

    def why(self, error: Exception) -> str:
        """What a failed download means, in words."""
        if self.unreachable:
            return f"the hub is unreachable ({self.unreachable}) and the files are not in the local hub cache"
        if self.offline:
            return "HF_HUB_OFFLINE is set and the files are not in the local hub cache"
        return f"{type(error).__name__}: {str(error)[:200]}"


@contextlib.contextmanager
def hub_or_cache(name: str) -> Iterator[HubReach]:
    """Download from the hub when it answers; when it does not, read the local hub cache only (no retries)."""
    from huggingface_hub import constants

    reach = HubReach(constants.HF_HUB_OFFLINE, None)
    if not reach.offline:
        reach.unreachable = hub_unreachable()
    if reach.unreachable:
        log.info("The hub is unreachable (%s): looking for %s in the local hub cache only.", reach.unreachable, name)
        constants.HF_HUB_OFFLINE = True  # huggingface_hub reads it per call: no connection attempts, no retries
    try:
        yield reach
    finally:
        constants.HF_HUB_OFFLINE = reach.offline
