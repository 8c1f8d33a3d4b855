"""The model card: a run's README.md in the Hugging Face Hub's format, from its transferkit.json content.

YAML metadata (written by huggingface_hub's own ``ModelCardData``, so the Hub and
``huggingface_hub.ModelCard`` parse it): library, pipeline tag, tags, the base model
where its weights came from the Hub, and the test metrics as ``model-index`` eval
results. The body: the data, the strategy and why (auto's reason and evidence),
the test metrics with their 95% intervals, the comparison when the run holds one,
and how to use the model with plain timm, ONNX Runtime and transferkit.

Intervals: an interval the run's metrics already hold (``<metric>_interval`` as
``[low, high]`` or ``{"low", "high"}``, an ``intervals`` mapping, or a metric stored
as ``{"value", "low", "high"}``) is shown as given; otherwise accuracy and top-5
accuracy get Wilson intervals from the test size and macro-F1 a bootstrap interval
from the test predictions, which the confusion matrix holds exactly
(:func:`transferkit.stats.evidence.score_with_intervals`).

Example:
    >>> text = model_card(read_meta("runs/plants").to_dict(), "plants")          # doctest: +SKIP
    >>> huggingface_hub.ModelCard(text).data.eval_results[0].metric_value  # doctest: +SKIP
    0.9627
"""

from __future__ import annotations

import logging

from transferkit.stats.intervals import score_with_intervals, wilson_interval
from transferkit.stats.wording import format_interval

CONFIDENCE = 0.95
METRICS = (
    ("accuracy", "Accuracy", "accuracy"),
    ("top5_accuracy", "Top-5 accuracy", "top_5_accuracy"),
    ("macro_f1", "Macro-F1", "f1"),
)  # (metrics.json key, shown name, Hub metric type)
WEIGHTS = {
    "builtin": "the built-in weights of `{name}` (shipped in a pip package, offline; see `transferkit models`)",
    "hub": "the Hugging Face Hub",
    "none": "nowhere: random initialisation",
}
MAX_CLASSES_SHOWN = 50
log = logging.getLogger(__name__)


def model_card(meta: dict, name: str) -> str:
    """README.md text for a run named `name` (its folder name) with transferkit.json content `meta`."""
    test = meta.get("metrics", {}).get("test", {})
    intervals = metric_intervals(test, len(meta["classes"]))
    sections = [
        _summary(meta, name, intervals),
        _data_section(meta),
        _training_section(meta),
        _results_section(meta, intervals),
        _comparison_section(meta),
        _usage_section(meta, name),
        _provenance_section(meta),
    ]
    body = "\n\n".join(s for s in sections if s)
    return f"---\n{card_metadata(meta, name).to_yaml()}\n---\n\n{body}\n"


def card_metadata(meta: dict, name: str):
    """The YAML header as huggingface_hub's ModelCardData (so it round-trips through ModelCard)."""
    from huggingface_hub import EvalResult, ModelCardData

    image = meta.get("modality", "image") == "image"
    task = "image-classification" if image else "text-classification"
    test = meta.get("metrics", {}).get("test", {})
    dataset = _dataset_name(meta)
    results = [
        EvalResult(
            task_type=task,
            dataset_type=_dataset_type(meta),
            dataset_name=dataset,
            dataset_split="test",
            metric_type=kind,
            metric_name=f"Test {shown[0].lower()}{shown[1:]}",
            metric_value=round(value, 4),
            metric_args={"average": "macro"} if key == "macro_f1" else None,
        )
        for key, shown, kind in METRICS
        if (value := metric_value(test, key)) is not None
    ]
    spec = meta.get("strategy", {}).get("spec", "")
    tags = ["transferkit", "transfer-learning" if spec == "feature-extraction" else "fine-tuning", task]
    tags += ["timm"] if image else ["transformers"]
    return ModelCardData(
        library_name="timm" if image else None,
        pipeline_tag=task,
        tags=tags,
        base_model=base_model(meta),
        model_name=name,
        eval_results=results or None,
    )


def base_model(meta: dict) -> str | None:
    """The Hub repository the pretrained weights came from, when they came from the Hub (else None).

    Built-in weights ship in pip packages; their values are not verified equal to any Hub repository's, so
    the card names the package in its body instead of claiming a base model.
    """
    backbone = meta.get("backbone", {})
    if backbone.get("weights") != "hub":
        return None
    repo = str(backbone.get("weights_digest", "")).partition("@")[0]
    return repo if repo.count("/") == 1 and "://" not in repo else None


def _dataset_name(meta: dict) -> str:
    source = str(meta.get("data", {}).get("source") or "data")
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _dataset_type(meta: dict) -> str:
    source = str(meta.get("data", {}).get("source") or "")
    if source.lower().endswith((".csv", ".tsv", ".jsonl")):
        return source.rsplit(".", 1)[-1].lower()
    if "/" in source or "\\" in source:
        return "imagefolder" if meta.get("modality", "image") == "image" else "text"
    return source or "custom"


# --------------------------------------------------------------------------- intervals


def metric_value(test: dict, key: str) -> float | None:
    """A test metric as a number, whether stored as one or as {"value", "low", "high"}."""
    value = test.get(key)
    value = value.get("value") if isinstance(value, dict) else value
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def metric_intervals(test: dict, n_classes: int) -> dict[str, dict]:
    """Each test metric's interval as {"value", "low", "high", "method"}: the run's own, else computed."""
    found = {key: entry for key, _, _ in METRICS if (entry := given_interval(test, key)) is not None}
    n = test.get("n")
    if not isinstance(n, int) or n <= 0:
        return found
    for key in ("accuracy", "top5_accuracy"):
        if key not in found and (value := metric_value(test, key)) is not None:
            low, high = wilson_interval(round(value * n), n, CONFIDENCE)
            found[key] = {"value": value, "low": low, "high": high, "method": "wilson"}
    if "macro_f1" not in found and (value := metric_value(test, "macro_f1")) is not None:
        entry = _macro_f1_from_confusion(test.get("confusion"), n_classes)
        if entry is not None and abs(entry["value"] - value) < 1e-9:  # the same definition of macro-F1
            found["macro_f1"] = entry
    return found


def given_interval(test: dict, key: str) -> dict | None:
    """An interval the metrics already hold for `key`, in any of the shapes the module doc lists, else None."""
    candidates = (test.get(f"{key}_interval"), (test.get("intervals") or {}).get(key), test.get(key))
    for c in candidates:
        if isinstance(c, list | tuple) and len(c) == 2 and all(isinstance(v, int | float) for v in c):
            return {"value": metric_value(test, key), "low": float(c[0]), "high": float(c[1]), "method": "as recorded"}
        if isinstance(c, dict) and isinstance(c.get("low"), int | float) and isinstance(c.get("high"), int | float):
            value = c.get("value", metric_value(test, key))
            return {
                "value": value if isinstance(value, int | float) else None,
                "low": float(c["low"]),
                "high": float(c["high"]),
                "method": str(c.get("method", "as recorded")),
            }
    return None


def _macro_f1_from_confusion(confusion, n_classes: int) -> dict | None:
    """The bootstrap interval of macro-F1 from the test predictions the confusion matrix holds (true rows)."""
    import numpy as np

    if not (isinstance(confusion, list) and len(confusion) == n_classes):
        return None
    counts = np.asarray(confusion, dtype=np.int64)
    if counts.shape != (n_classes, n_classes) or counts.sum() == 0:
        return None
    y_true = np.repeat(np.repeat(np.arange(n_classes), n_classes), counts.ravel())
    y_pred = np.repeat(np.tile(np.arange(n_classes), n_classes), counts.ravel())
    return score_with_intervals(y_true, y_pred, n_classes, confidence=CONFIDENCE)["macro_f1"]


# --------------------------------------------------------------------------- sections


def _cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _summary(meta: dict, name: str, intervals: dict) -> str:
    backbone, spec = meta["backbone"], meta["strategy"].get("spec", "?")
    what = "images" if meta.get("modality", "image") == "image" else "texts"
    line = (
        f"A {len(meta['classes'])}-class classifier of {what}, adapted from `{backbone.get('name') or backbone['arch']}` "
        f"by **{spec}** with transferkit on `{_cell(_dataset_name(meta))}`."
    )
    acc = intervals.get("accuracy")
    if acc and acc.get("value") is not None:
        n = meta.get("metrics", {}).get("test", {}).get("n")
        line += f" Test accuracy {format_interval(acc['value'], acc['low'], acc['high'])}" + (f", n = {n}." if n else ".")
    return f"# {_cell(name)}\n\n{line}"


def _data_section(meta: dict) -> str:
    data, classes = meta.get("data", {}), meta["classes"]
    sizes = meta.get("metrics", {}).get("split_sizes", {})
    rows = [f"- Source: `{_cell(data.get('source', '?'))}` ({data.get('found', '?')} found)"]
    skipped = data.get("skipped") or {}
    if skipped:
        rows.append("- Skipped: " + ", ".join(f"{len(v) if isinstance(v, list) else v} {k}" for k, v in skipped.items()))
    if sizes:
        rows.append("- Split: " + ", ".join(f"{sizes[k]} {k}" for k in ("train", "val", "test") if k in sizes))
    shown = ", ".join(f"`{_cell(c)}`" for c in classes[:MAX_CLASSES_SHOWN])
    more = f" and {len(classes) - MAX_CLASSES_SHOWN} more" if len(classes) > MAX_CLASSES_SHOWN else ""
    rows.append(f"- Classes ({len(classes)}, in logit order): {shown}{more}")
    return "## Data\n\n" + "\n".join(rows)


def _training_section(meta: dict) -> str:
    strategy, training = meta["strategy"], meta.get("training", {})
    lines = [f"- Strategy: **{strategy.get('spec')}** (requested: {strategy.get('requested', strategy.get('spec'))})"]
    auto = strategy.get("auto")
    if auto:
        lines.append(f"- Why: {_cell(auto.get('reason', ''))}")
        evidence = ", ".join(f"{k} {_number(v)}" for k, v in (auto.get("measurements") or {}).items())
        if evidence:
            lines.append(f"- auto's measurements: {evidence}")
    keys = ("epochs", "lr", "batch_size", "optimizer", "augment", "label_smoothing", "seed")
    settings = ", ".join(f"{k} {training[k]}" for k in keys if training.get(k) is not None)
    if settings:
        lines.append(f"- Settings: {settings}")
    table = [
        "| phase | on cached features | epochs | best epoch | best val acc | trainable blocks | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in strategy.get("phases", []):
        blocks = ", ".join(p.get("trainable_blocks") or []) or "head only"
        table.append(
            f"| {_cell(p.get('name'))} | {'yes' if p.get('on_features') else 'no'} | {p.get('epochs_run', '')} | "
            f"{p.get('best_epoch', '')} | {_number(p.get('best_val_acc'))} | {_cell(blocks)} | "
            f"{_number(p.get('seconds'))} |"
        )
    phases = "\n\n" + "\n".join(table) if len(table) > 2 else ""
    return "## Training\n\n" + "\n".join(lines) + phases


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else _cell(value)


def _results_section(meta: dict, intervals: dict) -> str:
    metrics = meta.get("metrics", {})
    test = metrics.get("test", {})
    if not test:
        return ""
    rows = ["| metric (test split) | value | 95% interval | method |", "|---|---|---|---|"]
    for key, shown, _ in METRICS:
        if (value := metric_value(test, key)) is not None:
            entry = intervals.get(key)
            span = f"{entry['low']:.4f} - {entry['high']:.4f}" if entry else "-"
            rows.append(f"| {shown} | {value:.4f} | {span} | {_cell(entry['method']) if entry else '-'} |")
    extra = [f"Test examples: {test.get('n', '?')}."]
    if isinstance(metrics.get("val_accuracy"), int | float):
        extra.append(f"Validation accuracy: {metrics['val_accuracy']:.4f} (chose the epoch kept).")
    return "## Results\n\n" + "\n".join(rows) + "\n\n" + " ".join(extra)


def _comparison_section(meta: dict) -> str:
    """The strategies compared on the same split, when the run holds a comparison (compare.json rows)."""
    comparison = meta.get("comparison")
    rows = comparison.get("results") if isinstance(comparison, dict) else comparison
    if not isinstance(rows, list) or not rows:
        return ""
    table = ["| strategy | trainable params | epochs | train time (s) | val acc | test acc |", "|---|---|---|---|---|---|"]
    for r in rows:
        if isinstance(r, dict):
            table.append(
                f"| {_cell(r.get('label') or r.get('strategy'))} | {r.get('trainable_params', '')} | "
                f"{r.get('epochs', '')} | {_number(r.get('seconds'))} | {_number(r.get('val_accuracy'))} | "
                f"{_number(r.get('test_accuracy'))} |"
            )
    return "## Comparison (same split and seed)\n\n" + "\n".join(table)


TIMM_USAGE = """Plain timm (no transferkit needed; `label_names` and the preprocessing come from `config.json`):

```python
import timm, torch
from PIL import Image

model = timm.create_model("hf-hub:REPO_ID", pretrained=True).eval()  # or "local-dir:NAME" for the run folder
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
labels = model.pretrained_cfg["label_names"]
with torch.no_grad():
    probs = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)).softmax(-1)[0]
label, probability = labels[int(probs.argmax())], float(probs.max())
```"""

ONNX_USAGE = """ONNX Runtime (export first: `transferkit export NAME --format onnx`, with `--int8` for the quantized
`model.int8.onnx`; the file carries its classes and preprocessing):

```python
import json, onnxruntime as ort, timm
from PIL import Image

session = ort.InferenceSession("NAME/model.onnx")
info = json.loads(session.get_modelmeta().custom_metadata_map["transferkit"])
transform = timm.data.create_transform(**info["data_config"])
x = transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0).numpy()
logits = session.run(["logits"], {"input": x})[0]
label = info["classes"][int(logits.argmax())]
```"""

TEXT_USAGE = """transformers (no transferkit needed; the encoder folder is transformers' own format):

```python
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

encoder, tokenizer = AutoModel.from_pretrained("NAME/encoder"), AutoTokenizer.from_pretrained("NAME/encoder")
head = load_file("NAME/head.safetensors")
batch = tokenizer(["some text"], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = encoder(**batch).last_hidden_state
POOLED
logits = pooled @ head["weight"].T + head["bias"]
```"""

POOLING = {
    "mean": 'mask = batch["attention_mask"].unsqueeze(-1).float()\npooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)',
    "cls": "pooled = hidden[:, 0]",
}

TRANSFERKIT_USAGE = """transferkit (a run folder; from the Hub: `hf download REPO_ID --local-dir NAME`):

```bash
transferkit predict NAME INPUT
```

```python
from transferkit import load_classifier

clf = load_classifier("NAME")
clf.predict([INPUT])
```"""


def _usage_section(meta: dict, name: str) -> str:
    if meta.get("modality", "image") == "image":
        parts = [TIMM_USAGE, ONNX_USAGE, TRANSFERKIT_USAGE.replace("INPUT", "photo.jpg", 1).replace("INPUT", '"photo.jpg"')]
    else:
        config = meta.get("data_config", {})
        parts = [
            TEXT_USAGE.replace("POOLED", POOLING.get(config.get("pooling"), POOLING["cls"])).replace(
                "MAX_LENGTH", str(config.get("max_length", 128))
            ),
            TRANSFERKIT_USAGE.replace("INPUT", '"some text"'),
        ]
    usage = "\n\n".join(parts).replace("NAME", name)
    return "## Usage\n\n" + usage + "\n\n`REPO_ID` is the repository `transferkit push " + name + " REPO_ID` uploaded to."


def _provenance_section(meta: dict) -> str:
    backbone = meta["backbone"]
    weights = WEIGHTS.get(backbone.get("weights"), "`{source}`").format(name=backbone.get("name"), source=backbone.get("weights"))
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    lines = [
        f"- Architecture: `{backbone['arch']}`; pretrained weights from {weights} (digest `{_cell(backbone.get('weights_digest', ''))}`)"
    ]
    if versions:
        lines.append(f"- Versions: {versions}")
    lines.append("- Everything above comes from `transferkit.json` in this repository.")
    return "## Provenance\n\n" + "\n".join(lines)
