"""transferkit: adapt pretrained models to your labelled data by transfer learning or fine-tuning, measured."""

__version__ = "0.1.0"

from transferkit.classifier import ImageClassifier  # noqa: E402
from transferkit.errors import DataError, ModelError, NotFittedError, RunError, TransferkitError, UsageError  # noqa: E402
from transferkit.text import TextClassifier  # noqa: E402

__all__ = ["ImageClassifier", "TextClassifier", "TransferkitError", "UsageError", "DataError", "ModelError", "RunError",
           "NotFittedError", "__version__"]
