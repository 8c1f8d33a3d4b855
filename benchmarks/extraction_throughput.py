"""Extraction throughput: transferkit's extract_features vs a plain fp32 NCHW inference_mode forward.

Same backbone (built-in EfficientNet-Lite0), the same 512 digits images at 64 px, same
batch size, measured in alternating rounds in one process. Two views:

* end to end: the same DataLoader (PIL -> transform -> batch) feeds both;
* model only: pre-transformed batches, so only the forward differs.

Then the accuracy cost of bf16: a logistic-regression probe (scikit-learn,
C chosen on the validation split) on transferkit's bf16 features vs on fp32
features, test accuracy.

Then the engines at 224 px, batch 32 (EfficientNet-Lite0 with its built-in weights,
ResNet-18 at random init: there are no ResNet-18 weights offline, and speed does not
depend on them): torch fp32 NCHW, torch bf16 autocast + channels_last (the torch
path), and OpenVINO by both conversion routes (ov.convert_model on the module, and
an in-memory torch.onnx.export(dynamo=True) read by OpenVINO), model only; then
end to end (generated 256 px JPEGs, decode + resize + forward) through
extract_features with engine torch vs openvino.

Run: python benchmarks/extraction_throughput.py [--engines-only]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import goal, header, interleaved_rates, table, tensor_batches, write_jpegs

from transferkit.backbones import load_backbone
from transferkit.data import DataSummary, load_data, load_digits_images, make_transform, read_paths
from transferkit.inference.extraction import autocast, extract_features, pooled_cut, resolve_precision, to_channels_last
from transferkit.inference.runners import frozen_runner

BATCH = 128  # extract_features' default
N_TIMED = 512  # images per timed pass (4 batches); the probe uses all 1,797
SEED = 0


def plain_forward(model: torch.nn.Module, batches) -> np.ndarray:
    """The baseline everyone writes: fp32, NCHW, inference_mode, the model's own pooled features."""
    out = []
    with torch.inference_mode():
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out)


def transferkit_model_only(bb, batches, dtype) -> None:
    """extract_features' inner step (channels_last input, autocast) on ready tensors."""
    with torch.inference_mode():
        for x in batches:
            with autocast(torch.device("cpu"), dtype):
                bb.features(to_channels_last(x)).float()


def probe_accuracy(train: np.ndarray, y_train, val: np.ndarray, y_val, test: np.ndarray, y_test) -> tuple[float, float]:
    """(C, test accuracy) of LogisticRegression with C picked on validation."""
    from sklearn.linear_model import LogisticRegression

    best = (-1.0, 0.0, None)
    for c in np.logspace(-3, 2, 6):
        clf = LogisticRegression(C=c, max_iter=2000).fit(train, y_train)
        acc = clf.score(val, y_val)
        if acc > best[0]:
            best = (acc, c, clf)
    return float(best[1]), float(best[2].score(test, y_test))


def main() -> None:
    header("extraction throughput: transferkit (bf16 autocast + channels_last) vs plain fp32 NCHW, digits 64 px")
    torch.manual_seed(SEED)
    splits = load_data("digits", seed=SEED)
    images = load_digits_images().subset(range(N_TIMED))
    bb = load_backbone("builtin:efficientnet_lite0", len(splits.classes))
    bb.configure_input(None, images.preprocess_hint)
    transform = make_transform(bb.data_config)  # the backbone's own preprocessing, for ready tensors
    cpu = torch.device("cpu")
    dtype = resolve_precision("auto", cpu)  # what transferkit uses for extraction here
    name = str(dtype).replace("torch.", "") if dtype else "fp32"
    print(f"transferkit's extraction precision on this CPU: {name}")

    nchw = load_backbone("builtin:efficientnet_lite0", len(splits.classes)).model.eval()  # untouched copy: NCHW fp32
    loader = torch.utils.data.DataLoader(bb.dataset(images), batch_size=BATCH, num_workers=0)
    ready = tensor_batches(images, transform, BATCH)
    n = len(images)
    end_to_end = interleaved_rates(
        {
            "plain": lambda: plain_forward(nchw, loader),
            "transferkit": lambda: extract_features(bb, images, device=cpu, dtype=dtype, batch_size=BATCH, workers=0, progress=False),
        },
        n,
    )
    model_only = interleaved_rates(
        {
            "plain": lambda: plain_forward(nchw, ready),
            "transferkit": lambda: transferkit_model_only(bb, ready, dtype),
        },
        n,
    )
    e2e_ratio = end_to_end["transferkit"] / end_to_end["plain"]
    model_ratio = model_only["transferkit"] / model_only["plain"]
    table(
        ["view", "plain fp32 NCHW img/s", f"transferkit {name} img/s", "ratio"],
        [
            ["end to end (decode + transform + forward)", end_to_end["plain"], end_to_end["transferkit"], e2e_ratio],
            ["model only (ready tensors)", model_only["plain"], model_only["transferkit"], model_ratio],
        ],
    )

    def split_loader(split: str):
        return torch.utils.data.DataLoader(bb.dataset(getattr(splits, split)), batch_size=BATCH)

    # fp32: the plain forward's float32 output; transferkit: its bf16 compute, stored as float16 as in the cache.
    feats = {
        "fp32": {s: plain_forward(nchw, split_loader(s)) for s in ("train", "val", "test")},
        name: {
            s: extract_features(bb, getattr(splits, s), device=cpu, dtype=dtype, progress=False, workers=0).astype(np.float32)
            for s in ("train", "val", "test")
        },
    }
    labels = {s: getattr(splits, s).labels for s in ("train", "val", "test")}
    rows, accs = [], {}
    for precision, f in feats.items():
        c, acc = probe_accuracy(f["train"], labels["train"], f["val"], labels["val"], f["test"], labels["test"])
        accs[precision] = acc
        rows.append([f"{precision} features", c, 100 * acc])
    table(["probe (LogisticRegression, C on val)", "C", "test acc %"], rows)
    diff = 100 * (accs[name] - accs["fp32"])
    goal(">= 2.5x images/s vs plain fp32 NCHW (end to end)", f"{e2e_ratio:.2f}x (model only {model_ratio:.2f}x)", e2e_ratio >= 2.5)
    goal(f"probe test accuracy, {name} vs fp32 features, within 0.5 point", f"{diff:+.2f} points", abs(diff) <= 0.5)


ENGINE_BATCH, ENGINE_SIZE, N_JPEGS = 32, 224, 256  # 256: the fewest images that get decoding workers
# (arch, weights, goal model only, goal end to end): OpenVINO against the torch path (bf16 + channels_last)
ENGINE_CASES = (("builtin:efficientnet_lite0", None, 2.5, 1.8), ("resnet18", "none", 1.4, 1.4))


def engine_rows(paths: list[Path]) -> None:
    """Model-only and end-to-end images/s of every engine at 224 px, ratios to the torch path."""
    images = read_paths(paths, [p.parent.name for p in paths], DataSummary("paths"), True)
    ready = list(torch.randn(2 * ENGINE_BATCH, 3, ENGINE_SIZE, ENGINE_SIZE).split(ENGINE_BATCH))
    for arch, weights, model_goal, e2e_goal in ENGINE_CASES:
        bb = load_backbone(arch, 4, weights=weights)
        bb.configure_input(ENGINE_SIZE, None)
        plain = load_backbone(arch, 4, weights=weights).model.eval()
        rates = model_only_rates(bb, plain, ready)
        base = next(r for name, r in rates.items() if name.endswith("(the torch path)"))
        table(
            [f"{arch} {ENGINE_SIZE}px model only, batch {ENGINE_BATCH}", "img/s", "vs torch path"],
            [[name, r, r / base] for name, r in rates.items()],
        )
        e2e = end_to_end_rates(bb, images)
        e2e_ratio = e2e["openvino"] / e2e["torch"]
        table(
            [f"{arch} end to end, {len(images)} JPEGs 256 px, {images.loader_workers()} workers", "img/s"],
            [[f"extract_features engine={k}", v] for k, v in e2e.items()],
        )
        best = max(r for name, r in rates.items() if name.startswith("openvino") and "f32" not in name)
        goal(f"{arch}: OpenVINO >= {model_goal}x the torch path, model only", f"{best / base:.2f}x", best / base >= model_goal)
        goal(f"{arch}: OpenVINO >= {e2e_goal}x the torch path, end to end", f"{e2e_ratio:.2f}x", e2e_ratio >= e2e_goal)


def model_only_rates(bb, plain: torch.nn.Module, ready: list[torch.Tensor]) -> dict[str, float]:
    """Images/s on ready tensors: torch fp32 NCHW, the torch path, OpenVINO f32 and bf16 by both routes."""
    cpu, dtype = torch.device("cpu"), resolve_precision("auto", torch.device("cpu"))
    cut, shape = pooled_cut(bb), (3, ENGINE_SIZE, ENGINE_SIZE)
    bb.model.eval()
    runners = {
        f"openvino {info.precision} ({route})": run
        for route in ("direct", "onnx")
        for run, info in [frozen_runner(cut, shape, device=cpu, precision=dtype, engine="openvino", route=route)]
    }
    runners["openvino f32 (direct)"] = frozen_runner(cut, shape, device=cpu, precision=None, engine="openvino")[0]
    bb.model.to(memory_format=torch.channels_last)
    contenders = {
        "torch fp32 NCHW": lambda: plain_forward(plain, ready),
        f"torch {'fp32' if dtype is None else 'bf16'}+cl (the torch path)": lambda: transferkit_model_only(bb, ready, dtype),
    }
    contenders |= {name: (lambda r=run: [r(x) for x in ready]) for name, run in runners.items()}
    return interleaved_rates(contenders, len(ready) * ENGINE_BATCH)


def end_to_end_rates(bb, images) -> dict[str, float]:
    """Images/s of extract_features (decode, resize, forward; compiling included) per engine."""
    cpu, dtype = torch.device("cpu"), resolve_precision("auto", torch.device("cpu"))
    return interleaved_rates(
        {
            engine: lambda e=engine: extract_features(
                bb, images, device=cpu, dtype=dtype, batch_size=ENGINE_BATCH, progress=False, engine=e
            )
            for engine in ("torch", "openvino")
        },
        len(images),
    )


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    if "--engines-only" not in sys.argv:
        main()
    else:
        header("extraction throughput: engines at 224 px")
    with tempfile.TemporaryDirectory() as tmp:
        engine_rows(write_jpegs(Path(tmp), N_JPEGS))
