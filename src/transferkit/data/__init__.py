"""Where labelled examples come from: images, texts and named datasets, split, summarised and transformed.

The layout: :mod:`~transferkit.data.examples` (the modality-neutral base,
summary, splits container), :mod:`~transferkit.data.images` (decoding, folder /
CSV / path readers, transforms), :mod:`~transferkit.data.texts` (CSV / TSV /
JSONL), :mod:`~transferkit.data.named` (digits, torchvision),
:mod:`~transferkit.data.splits` (stratified seeded splits) and
:mod:`~transferkit.data.sources` (one entry point per job, and the modality).
"""

from transferkit.data.examples import DEFAULT_SPLIT, SPLIT_NAMES, DataSplits, DataSummary, Examples
from transferkit.data.images import (
    ArrayImages,
    FileImages,
    ImageSet,
    TransformedImages,
    check_image,
    inspect_image,
    make_transform,
    read_csv,
    read_paths,
    resolve_data_config,
)
from transferkit.data.named import BUILTIN_DATASETS, cache_dir, load_digits_images
from transferkit.data.sources import detect_modality, load_data, load_eval, load_image_data
from transferkit.data.splits import split_stratified, subsample_per_class, validate_split
from transferkit.data.texts import TextSet, load_text_data

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_SPLIT",
    "SPLIT_NAMES",
    "ArrayImages",
    "DataSplits",
    "DataSummary",
    "Examples",
    "FileImages",
    "ImageSet",
    "TextSet",
    "TransformedImages",
    "cache_dir",
    "check_image",
    "detect_modality",
    "inspect_image",
    "load_data",
    "load_digits_images",
    "load_eval",
    "load_image_data",
    "load_text_data",
    "make_transform",
    "read_csv",
    "read_paths",
    "resolve_data_config",
    "split_stratified",
    "subsample_per_class",
    "validate_split",
]
