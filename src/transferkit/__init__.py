"""transferkit: adapt pretrained models to your labelled data by transfer learning or fine-tuning, measured.

The public names are imported when first used, so ``import transferkit`` (and
``transferkit --help``) stays fast and loads neither torch nor timm.

Example:
    >>> from transferkit import ImageClassifier
    >>> ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction")
    ImageClassifier(model='builtin:efficientnet_lite0', strategy='feature-extraction')
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
LAZY = {
    "ImageClassifier": "transferkit.classifier",
    "TextClassifier": "transferkit.classifier",
    "load_classifier": "transferkit.classifier",
    "diagnose": "transferkit.doctor.diagnose",
    "Diagnosis": "transferkit.doctor.findings",
    "TransferkitError": "transferkit.errors",
    "UsageError": "transferkit.errors",
    "DataError": "transferkit.errors",
    "ModelError": "transferkit.errors",
    "RunError": "transferkit.errors",
    "NotFittedError": "transferkit.errors",
}

__all__ = [*LAZY, "__version__"]


def __getattr__(name: str):
    if name in LAZY:
        value = getattr(importlib.import_module(LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
