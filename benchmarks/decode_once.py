"""Decode once for fine-tuning: an epoch on stored pixels vs an epoch that decodes the JPEG files again.

Generated photo-like JPEGs (JPEG_SIZE px square, quality 90) in a temporary folder,
built-in EfficientNet-Lite0 with every block trainable, set up as `finetune:all`
sets it up (transferkit's param groups with layer-wise decay, BatchNorm frozen,
channels_last, the training precision resolve_precision picks here), batch 32.
One epoch = the training loader over every image + forward, backward and step.

* decode each epoch: the backbone's own dataset over the files, with the loader
  workers transferkit picks for the set (FileImages.loader_workers);
* stored pixels: `decoded.decode_once`'s dataset (uint8 pixels in the cache,
  decoded once before the timing), 0 workers;
* the loaders alone (no model): what the data costs per epoch.

At 64 px (the digits demo's size) and 224 px (Lite0's own), in alternating
rounds in one process. `main_end_to_end` (run by finetune_throughput.py) adds
the plain fp32 loop over the files as the baseline.

Run: python benchmarks/decode_once.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from _common import goal, header, interleaved_rates, table, write_jpegs
from torch import nn

from transferkit.backbones import freeze, load_backbone
from transferkit.cache.features import FeatureCache
from transferkit.cache.pixels import decode_once
from transferkit.data import DataSummary, read_paths
from transferkit.inference.extraction import resolve_precision
from transferkit.training.config import FINETUNE_LR, TrainConfig
from transferkit.training.loop import make_loss, make_optimizer, train_epoch

JPEG_SIZE = 320  # px: a little over 224, like a downscaled photo
BATCH = 32
IMAGES = {64: 384, 224: 96}  # per epoch: about the same seconds at either size
SEED = 0
CPU = torch.device("cpu")


def jpeg_set(folder: Path, n: int):
    paths = write_jpegs(folder, n, size=JPEG_SIZE)
    return read_paths(paths, [p.parent.name for p in paths], DataSummary("paths"), strict=True)


def loaders(bb, images, cache_root: Path) -> dict[str, torch.utils.data.DataLoader]:
    """The two training loaders over `images`: decoding each epoch, and over pixels stored once (decoded now)."""
    gen = torch.Generator().manual_seed(SEED)
    decode = torch.utils.data.DataLoader(
        bb.dataset(images, "none"),
        batch_size=BATCH,
        shuffle=True,
        generator=gen,
        num_workers=images.loader_workers(),
        collate_fn=bb.collate,
        persistent_workers=images.loader_workers() > 0,
    )
    stored, note = decode_once(bb, {"train": (images, "none")}, FeatureCache(cache_root), 10**12, workers=None, progress=False)
    assert note["train"]["used"], note
    kept = torch.utils.data.DataLoader(stored["train"], batch_size=BATCH, shuffle=True, generator=gen, collate_fn=bb.collate)
    return {"decode each epoch": decode, "stored pixels": kept}


def transferkit_epoch(bb, loader, dtype):
    """finetune:all's set-up, then transferkit's own train_epoch over `loader`."""
    cfg = TrainConfig()
    n = len(bb.blocks)
    groups = freeze.param_groups(bb, n, cfg.backbone_lr_scale, cfg.layer_decay, cfg.weight_decay)
    freeze.set_trainable_(bb, n)
    model = bb.model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(groups, FINETUNE_LR, cfg.weight_decay, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = make_loss(cfg)

    def train_mode() -> None:
        model.train()
        freeze.set_bn_modes_(bb, "all-frozen")

    return lambda: train_epoch(model, loader, optimizer, scheduler, loss_fn, cfg, CPU, dtype, train_mode)


def plain_epoch(bb, loader):
    """The loop a tutorial writes over the same files: fp32, NCHW, one AdamW, decoding every epoch."""
    model = bb.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINETUNE_LR, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for x, y, _ in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def backbone(size: int):
    torch.manual_seed(SEED)
    bb = load_backbone("builtin:efficientnet_lite0", 4)
    bb.configure_input(size)
    return bb


def epoch_ratios(size: int, tmp: Path, dtype) -> tuple[dict[str, float], dict[str, float]]:
    """img/s of the loaders alone and of whole epochs, per contender, at `size` px."""
    images = jpeg_set(tmp / f"jpegs-{size}", IMAGES[size])
    bb = backbone(size)
    data = loaders(bb, images, tmp / f"cache-{size}")
    alone = interleaved_rates({k: (lambda ld=ld: [None for _ in ld]) for k, ld in data.items()}, len(images), rounds=3)
    epochs = interleaved_rates({k: transferkit_epoch(backbone(size), ld, dtype) for k, ld in data.items()}, len(images), rounds=3)
    return alone, epochs


def main() -> None:
    dtype = resolve_precision("auto", CPU, training=True)
    header(
        f"decode once: fine-tuning epochs on stored pixels vs decoding {JPEG_SIZE} px JPEGs each epoch, "
        f"EfficientNet-Lite0 finetune:all ({'fp32' if dtype is None else str(dtype)[6:]}), batch {BATCH}"
    )
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="tk-bench-d-") as tmp:
        for size in (64, 224):
            alone, epochs = epoch_ratios(size, Path(tmp), dtype)
            ratios[size] = epochs["stored pixels"] / epochs["decode each epoch"]
            rows.append(
                [
                    f"{size} px",
                    IMAGES[size],
                    alone["decode each epoch"],
                    alone["stored pixels"],
                    epochs["decode each epoch"],
                    epochs["stored pixels"],
                    ratios[size],
                ]
            )
    table(
        ["input", "images", "loader: decode img/s", "loader: stored img/s", "epoch: decode img/s", "epoch: stored img/s", "epoch ratio"],
        rows,
    )
    for size, r in ratios.items():
        goal(f"epochs on stored pixels faster than decoding each epoch at {size} px", f"{r:.2f}x", r > 1.0)


def main_end_to_end() -> None:
    """finetune_throughput.py's end-to-end goal: transferkit's fine-tune epoch vs the plain loop, both on JPEG files."""
    dtype = resolve_precision("auto", CPU, training=True)
    size = 64
    print(f"\n# end to end: one epoch over {IMAGES[size]} JPEG files ({JPEG_SIZE} px) at {size} px, data loading included")
    with tempfile.TemporaryDirectory(prefix="tk-bench-d-") as tmp:
        images = jpeg_set(Path(tmp) / "jpegs", IMAGES[size])
        data = loaders(backbone(size), images, Path(tmp) / "cache")
        contenders = {
            "plain fp32 loop, decoding each epoch (baseline)": plain_epoch(backbone(size), data["decode each epoch"]),
            "transferkit finetune:all, decoding each epoch": transferkit_epoch(backbone(size), data["decode each epoch"], dtype),
            "transferkit finetune:all, stored pixels": transferkit_epoch(backbone(size), data["stored pixels"], dtype),
        }
        rates = interleaved_rates(contenders, len(images), rounds=3)
    base = rates["plain fp32 loop, decoding each epoch (baseline)"]
    table(["configuration", "img/s", "ratio"], [[name, r, r / base] for name, r in rates.items()])
    ratio = rates["transferkit finetune:all, stored pixels"] / base
    goal(">= 1.8x fine-tuning images/s vs plain fp32 loop, end to end (JPEG files)", f"{ratio:.2f}x", ratio >= 1.8)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
