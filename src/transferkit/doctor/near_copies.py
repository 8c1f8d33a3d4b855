"""Near-copies found in input space: images by their small grey thumbnails, texts by their character 3-grams.

The data doctor's near-duplicates (leakage across splits, conflicts and duplicates within one) are pairs
of examples that are, in effect, the same picture or the same text: a copy re-encoded at another JPEG
quality, resized a little, or a text that differs in case and spacing. Backbone features alone could
not say so: on digits, whose 8x8 images look alike in feature space, a centred-feature cosine of 0.8
paired 5,579 of 1.6M pairs, and the same features put re-encoded copies as low as 0.56 (JPEG 95 -> 85,
128 -> 124 px; 16 copies among 64 generated pictures, default precision), heavily re-compressed ones
(JPEG 20) at 0.14 to 0.41 and quarter-size ones below 0, while distinct pictures reached 0.74; no
feature threshold, however permissive, was a safe first stage. So the pairs are searched in input space, exhaustively and in blocks:

* images: each example (`Examples.load(i)`, RGB) reduced to THUMBNAIL x THUMBNAIL grey pixels
  (Lanczos, antialiased); the similarity is the Pearson correlation of the two thumbnails, which
  ignores brightness and contrast. Re-encoded copies of generated pictures measured >= 0.9997
  (JPEG 85, 124 px), >= 0.996 (JPEG 20), >= 0.990 (a quarter of the size, JPEG 50), >= 0.981 (2%
  cropped away); distinct pictures of one class at most 0.58. A shift of a few pixels, a 5% crop
  or a mirror image is not a near-copy at this threshold.
* texts: casefolded, whitespace collapsed; the similarity is the Jaccard index of the character
  3-grams. Template sentences that differ only in an opening word ("Yesterday the chef ...") reached
  0.85; the same sentence without its commas 0.93, in capitals or with doubled spaces 1.0.

The centred feature cosine of each pair is reported beside its input similarity (how alike the
backbone sees the two), but does not decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from transferkit.errors import UsageError

THUMBNAIL = 16  # px a side: small enough that re-encoding and a 2% crop vanish, large enough to tell pictures apart
# Input similarity at and above which two examples are near-copies, by modality (see the module docstring).
# Images: 0.98 keeps the measured copies (>= 0.981) and on digits, which has no two equal arrays, finds 77 of
# its 1.6M pairs (29 across splits), whose 8x8 arrays correlate >= 0.972 (median absolute difference 0.65 of
# 16 grey levels): look-alikes at that resolution, mostly 1s. 0.99 would find 5 pairs; 0.95, 2,078.
# Texts: 0.9, above the distinct template sentences (<= 0.85), below punctuation-only edits (0.93).
MATCH_THRESHOLD = {"image": 0.98, "text": 0.9}
GRAM = 3  # characters per text n-gram
MEASURES = {
    "image": f"Pearson correlation of {THUMBNAIL}x{THUMBNAIL} grey thumbnails",
    "text": f"Jaccard index of character {GRAM}-grams (casefolded, whitespace collapsed)",
}


class CopyPair(NamedTuple):
    """Two examples (indices into the examples searched) and their input similarity, in [-1, 1]."""

    i: int
    j: int
    similarity: float


def default_threshold(modality: str) -> float:
    """The input-similarity threshold of a modality ("image" or "text")."""
    return MATCH_THRESHOLD.get(modality, MATCH_THRESHOLD["image"])


def thumbnail(image, size: int = THUMBNAIL) -> np.ndarray:
    """(size * size,) float32 grey pixels of a PIL image, mean removed and scaled to unit length (zero if flat)."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32).ravel()
    grey = grey - grey.mean()
    norm = float(np.linalg.norm(grey))
    return grey / norm if norm > 1e-3 else np.zeros_like(grey)


def image_copies(images: Iterable, *, threshold: float, block: int = 1024) -> list[CopyPair]:
    """Pairs i < j of images (PIL; read one at a time) whose thumbnails correlate >= threshold, most similar first.

    The Pearson correlation of two thumbnails is the cosine of their centred pixels, so the search is
    `pairs.near_duplicates`' blockwise one: memory O(block^2) besides the n x 256 thumbnails. Two flat
    images (one grey level each) correlate 0 with everything.

    Example:
        >>> from PIL import Image
        >>> a = Image.linear_gradient("L").convert("RGB")
        >>> [(p.i, p.j) for p in image_copies([a, a.resize((200, 200)), a.rotate(90)], threshold=0.98)]
        [(0, 1)]
    """
    from transferkit.doctor.pairs import near_duplicates

    thumbs = np.array([thumbnail(im) for im in images], dtype=np.float32).reshape(-1, THUMBNAIL**2)
    return [CopyPair(p.i, p.j, p.cosine) for p in near_duplicates(thumbs, threshold=threshold, block=block)]


def normalise_text(text: str) -> str:
    """Casefolded, runs of whitespace made one space, ends stripped."""
    return " ".join(str(text).casefold().split())


def text_copies(texts: Sequence[str], *, threshold: float, block: int = 1024) -> list[CopyPair]:
    """Pairs i < j of texts whose character 3-gram sets have Jaccard index >= threshold, most similar first.

    3-grams are hashed into 2**20 columns (sklearn's HashingVectorizer; a collision among a text's few
    hundred 3-grams is rare) and intersections counted `block` rows at a time: memory O(block * n).
    Texts shorter than 3 characters after normalising are one 'gram' of themselves.

    Example:
        >>> [(p.i, p.j) for p in text_copies(["The cat sat.", "the  CAT sat.", "A dog ran."], threshold=0.9)]
        [(0, 1)]
    """
    from sklearn.feature_extraction.text import HashingVectorizer

    if not len(texts):
        return []
    docs = [normalise_text(t) for t in texts]
    docs = [d if len(d) >= GRAM else d.ljust(GRAM, "\0") for d in docs]  # a short text is its own 3-gram
    grams = (
        HashingVectorizer(
            analyzer="char", ngram_range=(GRAM, GRAM), lowercase=False, norm=None, alternate_sign=False, binary=True, n_features=2**20
        )
        .transform(docs)
        .tocsr()
    )
    sizes = np.asarray(grams.sum(axis=1)).ravel()
    found: list[CopyPair] = []
    for i0 in range(0, len(docs), block):
        inter = (grams[i0 : i0 + block] @ grams[i0:].T).toarray()
        union = sizes[i0 : i0 + block, None] + sizes[None, i0:] - inter
        jac = np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)
        ii, jj = np.nonzero(np.triu(jac >= threshold, k=1))  # j > i within the block row
        found += [CopyPair(int(a + i0), int(b + i0), float(jac[a, b])) for a, b in zip(ii, jj)]
    return sorted(found, key=lambda p: (-p.similarity, p.i, p.j))


def find_copies(examples: Iterable, modality: str, *, threshold: float, block: int = 1024) -> list[CopyPair]:
    """Near-copies among loaded examples (PIL images or strings) by the modality's input similarity."""
    if not (isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 < threshold <= 1):
        raise UsageError(f"threshold must be an input similarity in (0, 1]; got {threshold!r}. The defaults: {MATCH_THRESHOLD}.")
    if modality == "text":
        return text_copies([str(t) for t in examples], threshold=threshold, block=block)
    return image_copies(examples, threshold=threshold, block=block)
