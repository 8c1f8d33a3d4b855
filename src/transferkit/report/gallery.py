"""Examples shown in the reports: inline thumbnails (texts as text), and the mistakes gallery.

`example_view(examples, i)` turns one example into what a page shows: a small
PNG as a base64 data URI for an image, the (shortened) string for a text, so
every page stays one self-contained file. `mistakes(...)` picks the
misclassified test examples, most confident mistakes (highest loss) first,
grouped by the most confused (true, predicted) class pairs; `mistakes_html`
renders them as an HTML fragment that the fit and compare reports include.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass

import numpy as np

from transferkit.report.environment import render

THUMBNAIL_PX = 96  # longest side of a thumbnail; small images (digits' 8x8) are enlarged to it, sharp
TEXT_CHARS = 300  # a text is shown up to this many characters
TOP_PAIRS = 6  # confused class pairs shown in the gallery
PER_PAIR = 8  # mistakes shown per pair, highest loss first


def example_view(examples, i: int) -> dict:
    """One example as a page shows it: {"src": data URI} for an image, {"text": string} for a text."""
    item = examples.load(i)
    if isinstance(item, str):
        return {"text": item if len(item) <= TEXT_CHARS else item[:TEXT_CHARS] + "…"}
    return {"src": thumbnail_uri(item)}


def thumbnail_uri(image) -> str:
    """A PIL image as a PNG data URI, its longest side THUMBNAIL_PX (enlarged without smoothing when smaller)."""
    from PIL import Image

    scale = THUMBNAIL_PX / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Mistake:
    """A misclassified example: where it is, its true and predicted class, the model's probabilities, its loss."""

    index: int
    id: str
    true: str
    pred: str
    prob_pred: float
    prob_true: float

    @property
    def loss(self) -> float:
        """Cross-entropy of the true class: -log p(true)."""
        return float(-np.log(max(self.prob_true, 1e-12)))


def mistakes(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], ids: list[str], *, top_pairs: int = TOP_PAIRS, per_pair: int = PER_PAIR
) -> list[tuple[tuple[str, str], int, list[Mistake]]]:
    """The most confused (true, predicted) pairs, most mistakes first, each with its highest-loss mistakes.

    Args:
        probs: (n, K) predicted probabilities of the evaluated examples.
        labels: (n,) true class indices.
        classes: the K class names; ids: one id per example.

    Returns:
        [((true, predicted), mistakes of that pair, [Mistake, ... highest loss first, at most per_pair])].
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    wrong = np.flatnonzero(pred != labels)
    pairs = Counter((int(labels[i]), int(pred[i])) for i in wrong)
    out = []
    for (t, p), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_pairs]:
        members = [i for i in wrong if labels[i] == t and pred[i] == p]
        members.sort(key=lambda i: probs[i, t])  # lowest p(true) = highest loss first
        shown = [Mistake(int(i), ids[i], classes[t], classes[p], float(probs[i, p]), float(probs[i, t])) for i in members[:per_pair]]
        out.append(((classes[t], classes[p]), n, shown))
    return out


def mistakes_html(examples, probs: np.ndarray, classes: list[str]) -> str:
    """The mistakes gallery of `examples` (the test split) as an HTML fragment (styled by report.css)."""
    ids = examples.ids()
    groups = mistakes(probs, examples.labels, classes, ids)
    context = [
        {
            "true": t,
            "pred": p,
            "count": n,
            "entries": [
                {
                    "view": example_view(examples, m.index),
                    "id": m.id,
                    "true": m.true,
                    "pred": m.pred,
                    "prob_true": m.prob_true,
                    "prob_pred": m.prob_pred,
                    "loss": m.loss,
                }
                for m in items
            ],
        }
        for (t, p), n, items in groups
    ]
    n_wrong = int((np.asarray(probs).argmax(axis=1) != examples.labels).sum()) if len(examples) else 0
    return render("mistakes.html.j2", groups=context, n=len(examples), n_wrong=n_wrong, noun=f"{examples.noun}s")
