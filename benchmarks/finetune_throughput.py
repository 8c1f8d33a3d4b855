"""Fine-tuning step throughput: transferkit's configuration vs a plain fp32 loop.

One step = forward + backward + optimizer step on a batch of 32 digits images
at 64 px (ready tensors, so decoding is not measured), all blocks trainable,
built-in EfficientNet-Lite0. Contenders, measured in alternating rounds:

* plain: fp32, NCHW, model.train(), one AdamW over all parameters;
* transferkit: what `finetune:all` runs here: engine.train_epoch with
  transferkit's param groups (layer-wise decay), BatchNorm all-frozen,
  grad clipping, channels_last, and the training precision resolve_precision
  picks for this device (fp32 on CPU);
* variants that isolate one choice each: fp32 channels_last, bf16 autocast
  (NCHW and channels_last).

Then end to end on JPEG files (decode_once.main_end_to_end): one epoch with
data loading, the plain loop decoding every epoch vs transferkit's fine-tune
decoding every epoch and on pixels decoded once (issue 17's decoded cache).

Run: python benchmarks/finetune_throughput.py
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from _common import goal, header, interleaved_rates, table, tensor_batches
from decode_once import main_end_to_end, transferkit_epoch
from torch import nn

from transferkit import backbones as bbs
from transferkit.data import load_data, make_transform
from transferkit.inference.extraction import resolve_precision
from transferkit.training.config import FINETUNE_LR

BATCH = 32  # TrainConfig's default fine-tuning batch
STEPS = 8  # steps per timed round
SEED = 0


class Steps:
    """A loader stand-in: the same `STEPS` ready batches every epoch, with labels."""

    def __init__(self, xs: list[torch.Tensor], ys: list[torch.Tensor]):
        self.batches = list(zip(xs, ys))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def fresh_backbone(n_classes: int) -> bbs.Backbone:
    torch.manual_seed(SEED)
    return bbs.load_backbone("builtin:efficientnet_lite0", n_classes)


def plain_step_fn(n_classes: int, steps: Steps, *, channels_last: bool = False, dtype: torch.dtype | None = None):
    """The loop a tutorial writes, optionally with channels_last and/or bf16 autocast."""
    model = fresh_backbone(n_classes).model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINETUNE_LR, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(x.contiguous(memory_format=torch.channels_last) if channels_last else x, y) for x, y in steps]

    def run() -> None:
        for x, y in batches:
            with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def transferkit_step_fn(n_classes: int, steps: Steps, dtype: torch.dtype | None):
    """transferkit's finetune:all phase set-up, then its own train_epoch over the same batches."""
    return transferkit_epoch(fresh_backbone(n_classes), steps, dtype)


def main() -> None:
    header(f"fine-tuning step throughput (forward+backward+step), EfficientNet-Lite0, digits 64 px, batch {BATCH}")
    splits = load_data("digits", seed=SEED)
    n_classes = len(splits.classes)
    bb = fresh_backbone(n_classes)
    bb.configure_input(None, splits.train.preprocess_hint)
    transform = make_transform(bb.data_config)  # the backbone's own preprocessing, for ready tensors
    xs = tensor_batches(splits.train.subset(range(BATCH * STEPS)), transform, BATCH)
    ys = list(torch.from_numpy(splits.train.labels[: BATCH * STEPS]).split(BATCH))
    steps = Steps(xs, ys)
    train_dtype = resolve_precision("auto", torch.device("cpu"), training=True)
    tk_name = f"transferkit finetune:all ({'fp32' if train_dtype is None else str(train_dtype)[6:]}, channels_last, BN frozen)"
    contenders = {
        "plain fp32 NCHW (baseline)": plain_step_fn(n_classes, steps),
        tk_name: transferkit_step_fn(n_classes, steps, train_dtype),
        "plain fp32 channels_last": plain_step_fn(n_classes, steps, channels_last=True),
        "plain bf16 autocast NCHW": plain_step_fn(n_classes, steps, dtype=torch.bfloat16),
        "plain bf16 autocast channels_last": plain_step_fn(n_classes, steps, channels_last=True, dtype=torch.bfloat16),
        "transferkit config with bf16": transferkit_step_fn(n_classes, steps, torch.bfloat16),
    }
    rates = interleaved_rates(contenders, BATCH * STEPS, rounds=3)
    base = rates["plain fp32 NCHW (baseline)"]
    table(["configuration", "img/s", "ratio"], [[name, r, r / base] for name, r in rates.items()])
    winner = max(rates, key=rates.get)
    print(f"fastest: {winner} ({rates[winner]:.0f} img/s)")
    ratio = rates[tk_name] / base
    goal(">= 1.8x fine-tuning images/s vs plain fp32 loop (model only)", f"{ratio:.2f}x", ratio >= 1.8)
    main_end_to_end()


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
