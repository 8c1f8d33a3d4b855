"""Text models: labelled texts, transformers encoders as backbones, and `TextClassifier`.

transformers is imported only when a text model is loaded, so image-only use stays fast.
"""

from transferkit.text.backbone import BUILTIN_TEXT_BACKBONES, TextBackbone, is_text_model, load_text_backbone
from transferkit.text.classifier import TextClassifier
from transferkit.text.data import TextSet, is_text_file, load_text_data

__all__ = ["TextClassifier", "TextBackbone", "TextSet", "load_text_backbone", "load_text_data", "is_text_file",
           "is_text_model", "BUILTIN_TEXT_BACKBONES"]
