"""Pretrained networks behind one contract for both modalities (:mod:`transferkit.backbones.base`).

:mod:`~transferkit.backbones.vision` loads timm image models (built-in weights,
the hub, a file, or none; :mod:`~transferkit.backbones.names` says what a name means), :mod:`~transferkit.backbones.text` transformers
encoders; :mod:`~transferkit.backbones.freeze` holds the freeze / BatchNorm /
param-group helpers, :mod:`~transferkit.backbones.prefix` the frozen-prefix
split and :mod:`~transferkit.backbones.lora` the LoRA adapters.

Example:
    >>> bb = load_backbone("builtin:efficientnet_lite0", num_classes=10)
    >>> bb.modality, [b.name for b in bb.blocks][:2]
    ('image', ['conv_stem+bn1', 'blocks.0'])
"""

from __future__ import annotations

from pathlib import Path

from transferkit.backbones.base import Backbone, BackboneSpec, Block
from transferkit.backbones.names import (
    BUILTIN_BACKBONES,
    DEFAULT_BACKBONE,
    builtin_for,
    canonical_name,
    timm_name,
)
from transferkit.backbones.text import (
    BUILTIN_TEXT_BACKBONES,
    DEFAULT_TEXT_BACKBONE,
    TextBackbone,
    is_text_model,
    load_text_backbone,
)
from transferkit.backbones.vision import ImageBackbone, check_image_backbone, list_image_models, load_image_backbone, resolve_arch
from transferkit.errors import UsageError

BACKBONE_TYPES: dict[str, type[Backbone]] = {"image": ImageBackbone, "text": TextBackbone}
DEFAULT_BACKBONES = {"image": DEFAULT_BACKBONE, "text": DEFAULT_TEXT_BACKBONE}


def model_modality(name: str) -> str | None:
    """'text' for a built-in text model or a transformers folder, 'image' for a built-in or timm name, else None."""
    import timm

    if is_text_model(name):
        return "text"
    if builtin_for(name) is not None or timm.is_model(timm_name(name).split(".")[0]):
        return "image"
    return None


def load_backbone(
    name: str | None = None, num_classes: int = 1000, *, modality: str | None = None, weights: str | Path | None = None, **options
) -> Backbone:
    """A pretrained backbone of `modality` with a new, zeroed head for `num_classes`.

    Args:
        name: a backbone name; None takes the modality's built-in default.
        modality: 'image' or 'text'; None infers it from the name (unknown names are tried as timm models).
        weights: None for the default source, a local file (images), or ``"none"`` for random initialisation.
        options: the modality's own loading options (text: ``pooling``, ``max_length``).

    Raises:
        UsageError: the name belongs to the other modality; the message says which and what to use.
    """
    modality = modality or (model_modality(name) if name else None) or "image"
    name = name or DEFAULT_BACKBONES[modality]
    refuse_other_modality(name, modality)
    if modality == "text":
        return load_text_backbone(name, num_classes, weights=None if weights is None else str(weights), **options)
    return load_image_backbone(name, num_classes, weights=weights, **options)


def refuse_other_modality(name: str, modality: str) -> None:
    """A text model asked to classify images (or the reverse) is a usage error naming both."""
    other = model_modality(name)
    if other is not None and other != modality:
        default = DEFAULT_BACKBONES[modality]
        raise UsageError(
            f"--model {name} is a {other} model, and this data is {modality}s. Use a {modality} backbone "
            f"(the built-in {default}, or see: transferkit models), or give {other} data."
        )


def check_backbone(name: str | None, modality: str, *, weights=None, lora: bool = False) -> None:
    """Before any data is read: a backbone of the other modality is refused, and an image backbone checked as far as
    its name tells (vision.check_image_backbone); a text model's hub name is checked as it loads."""
    if name is not None:
        refuse_other_modality(name, modality)
    if modality == "image":
        check_image_backbone(name, weights=weights, lora=lora)


def read_trained(run_dir: Path, *, modality: str, spec: dict, n_classes: int, data_config: dict) -> Backbone:
    """The trained backbone of a run directory, by its modality: `spec` (BackboneSpec.to_dict()), its number of
    classes and its preprocessing, as the run's record holds them."""
    return BACKBONE_TYPES[modality].read_trained(run_dir, spec=spec, n_classes=n_classes, data_config=data_config)


def list_models(filter: str = "") -> dict[str, list[str]]:
    """Built-in image and text backbones and timm architectures matching a wildcard filter."""
    import fnmatch

    found = list_image_models(filter)
    pattern = filter if any(c in filter for c in "*?[") else f"*{filter}*"
    found["builtin_text"] = [n for n in BUILTIN_TEXT_BACKBONES if not filter or fnmatch.fnmatch(n, pattern)]
    return found


__all__ = [
    "BACKBONE_TYPES",
    "BUILTIN_BACKBONES",
    "BUILTIN_TEXT_BACKBONES",
    "DEFAULT_BACKBONE",
    "DEFAULT_BACKBONES",
    "DEFAULT_TEXT_BACKBONE",
    "Backbone",
    "BackboneSpec",
    "Block",
    "ImageBackbone",
    "TextBackbone",
    "canonical_name",
    "is_text_model",
    "list_models",
    "load_backbone",
    "load_image_backbone",
    "load_text_backbone",
    "model_modality",
    "read_trained",
    "refuse_other_modality",
    "resolve_arch",
    "timm_name",
]
