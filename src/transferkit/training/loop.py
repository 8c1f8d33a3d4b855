"""The one training loop: every phase of every strategy, on images, texts or cached features, runs here.

The optimizer applies each param group's `lr_scale` (layer-wise decay is data,
set by :func:`transferkit.backbones.freeze.param_groups`), then warmup + cosine,
gradient accumulation and clipping, early stopping with best-weights restore,
exact resume. A phase on cached features and a phase on images differ only in
the module and the loaders they hand in.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from transferkit.distributed import Replicas
from transferkit.errors import ResourceError, UsageError
from transferkit.inference.extraction import autocast, predict_logits, to_channels_last
from transferkit.progress import make_progress
from transferkit.training.config import TrainConfig

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and Python; returns a generator for data order."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class PhaseResult:
    """What a phase did: per-epoch history, best epoch and its validation accuracy."""

    name: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_acc: float = -1.0
    seconds: float = 0.0


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then cosine decay to zero."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(groups: list[dict], lr: float, weight_decay: float, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or SGD with Nesterov momentum) over param groups; each group runs at ``lr * group['lr_scale']``.

    This is the one place a group's scale becomes its rate; a group's own 'weight_decay' (0 for 1-D
    parameters) wins over `weight_decay`.
    """
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g.setdefault("weight_decay", weight_decay)
        g["initial_lr"] = g["lr"]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise UsageError(f"optimizer must be adamw or sgd; got '{kind}'.")


def rng_state(loader_generator: torch.Generator | None) -> dict:
    """Every random state a resumed run needs to continue exactly (tensors and plain tuples only)."""
    import random

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, cached),
        "loader": loader_generator.get_state() if loader_generator is not None else None,
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state_(state: dict, loader_generator: torch.Generator | None) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_loss(cfg: TrainConfig, class_weights: torch.Tensor | None = None) -> nn.Module:
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)


def _noop(*args) -> None:
    return None


@dataclass
class Hooks:
    """What the owner of a phase does around the loop; each default does nothing.

    Attributes:
        epoch_start: called with the epoch index before it runs (gradual unfreezing).
        train_mode: puts the model in training mode (None: ``model.train()``); strategies use it
            to keep BatchNorm layers on their stored statistics.
        epoch_end: receives the loop state after each epoch (a checkpoint, experiment tracking).
    """

    epoch_start: Callable[[int], object] = _noop  # its return value is ignored
    train_mode: Callable[[], None] | None = None
    epoch_end: Callable[[dict], None] = _noop


@dataclass
class PhaseSpec:
    """How long and how a phase trains: everything the loop needs besides the model and its data."""

    name: str
    epochs: int
    lr: float  # the head's rate; groups scale it by their lr_scale
    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    warmup_epochs: float = 0.0
    class_weights: torch.Tensor | None = None
    progress: bool = True
    replicas: Replicas | None = None  # several processes train together (DDP)
    start_best: float = -1.0  # validation accuracy an epoch must beat to be kept (the model as handed in)


@dataclass(kw_only=True)
class _Progress:
    """Where a phase's loop stands: its result so far, the best weights, epochs since they were found, the next epoch."""

    result: PhaseResult
    best_state: dict | None
    since_best: int = 0
    first: int = 0


def run_phase(
    model: nn.Module, groups: list[dict], train_loader, val_loader, spec: PhaseSpec, hooks: Hooks | None = None, resume: dict | None = None
) -> PhaseResult:
    """Train `model` for `spec.epochs`, keep the weights with the best validation accuracy.

    With `spec.start_best` >= 0 the weights handed in count as a candidate with that accuracy: an
    epoch must beat it to replace them, so a phase never ends worse on validation than it began.
    With `spec.replicas` the training pass runs through ``replicas.wrap(model)``, the loaders hold
    this process's share and metrics are summed across processes; `model` itself stays bare.
    `resume` is a loop state from `hooks.epoch_end` to continue from, exactly.
    """
    hooks = hooks or Hooks()
    cfg = spec.cfg
    optimizer = make_optimizer(groups, spec.lr, cfg.weight_decay, cfg.optimizer)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.accumulate))
    schedule = warmup_cosine(spec.epochs * steps_per_epoch, int(spec.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = getattr(train_loader, "generator", None)
    state = _Progress(
        result=PhaseResult(spec.name, best_val_acc=spec.start_best, best_epoch=0 if spec.start_best >= 0 else -1),
        best_state=copy.deepcopy(model.state_dict()) if spec.start_best >= 0 else None,
    )
    if resume is not None:
        _restore_loop(resume, model, optimizer, scheduler, generator, state)
    start = time.perf_counter()
    with make_progress(spec.progress) as bar:
        task = bar.add_task(spec.name, total=spec.epochs, completed=state.first, info="")
        for epoch in range(state.first, spec.epochs):
            if cfg.patience is not None and state.since_best >= cfg.patience:
                break  # early-stopped before an interruption
            row = _one_epoch(model, epoch, train_loader, val_loader, optimizer, scheduler, spec, hooks)
            _keep_if_best(model, row, state)
            bar.update(task, advance=1, info=f"loss {row['train_loss']:.3f} val {row['val_acc']:.3f}")
            hooks.epoch_end(_loop_state(model, optimizer, scheduler, generator, state, epoch + 1))
    result = state.result
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    result.seconds = time.perf_counter() - start
    return result


def _one_epoch(model, epoch: int, train_loader, val_loader, optimizer, scheduler, spec: PhaseSpec, hooks: Hooks) -> dict:
    hooks.epoch_start(epoch)
    if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
        train_loader.sampler.set_epoch(epoch)  # DistributedSampler: the order depends on seed and epoch
    t0 = time.perf_counter()
    loss_fn = make_loss(spec.cfg, spec.class_weights)
    trained = spec.replicas.wrap(model) if spec.replicas else model
    train_loss, train_acc = train_epoch(
        trained, train_loader, optimizer, scheduler, loss_fn, spec.cfg, spec.device, spec.dtype, hooks.train_mode, spec.replicas
    )
    val_acc = validation_accuracy(model, val_loader, spec.device, spec.dtype, spec.replicas)
    return {
        "phase": spec.name,
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_acc": val_acc,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _keep_if_best(model: nn.Module, row: dict, state: _Progress) -> None:
    result = state.result
    result.history.append(row)
    if row["val_acc"] > result.best_val_acc:
        result.best_val_acc, result.best_epoch, state.since_best = row["val_acc"], row["epoch"], 0
        state.best_state = copy.deepcopy(model.state_dict())
    else:
        state.since_best += 1


def _loop_state(model, optimizer, scheduler, generator, state: _Progress, epoch: int) -> dict:
    result = state.result
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(generator),
        "best_state": state.best_state,
        "since_best": state.since_best,
        "history": result.history,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
    }


def _restore_loop(resume: dict, model, optimizer, scheduler, generator, state: _Progress) -> None:
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    # The rate at the step reached on this schedule (the same value unless --epochs grew, which recomputes it).
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    set_rng_state_(resume["rng"], generator)
    result = state.result
    state.best_state, state.since_best, state.first = resume["best_state"], resume["since_best"], resume["epoch"]
    result.history, result.best_val_acc, result.best_epoch = resume["history"], resume["best_val_acc"], resume["best_epoch"]


def validation_accuracy(
    model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None, replicas: Replicas | None = None
) -> float:
    """Accuracy over `loader`; with `replicas`, over every process's share of the validation set."""
    logits, y = predict_logits(model, loader, device, dtype)
    correct: float = int((logits.argmax(1) == y).sum()) if len(y) else 0
    total: float = len(y)
    if replicas:
        correct, total = replicas.sum(correct, total)
    return correct / max(1, total)


def train_epoch(
    model: nn.Module,
    loader,
    optimizer,
    scheduler,
    loss_fn,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    train_mode: Callable[[], None] | None = None,
    replicas: Replicas | None = None,
) -> tuple[float, float]:
    """One pass over `loader` with gradient accumulation and clipping; returns (loss, accuracy).

    With `replicas` the loss and accuracy are over the images of every process.
    """
    if train_mode:
        train_mode()
    else:
        model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total_loss, correct, seen = 0.0, 0.0, 0.0
    chunks = 1  # pieces each batch is computed in; doubles on device out-of-memory
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        x, y = to_channels_last(batch[0].to(device, non_blocking=True)), batch[1].to(device)
        while True:
            try:
                logits, loss = forward_backward(model, loss_fn, x, y, chunks, cfg.accumulate, device, dtype)
                break
            except torch.OutOfMemoryError as e:
                if replicas:  # pieces would give this process more gradient all-reduces than the others: a hang
                    raise ResourceError(
                        f"Out of {device} memory at {len(x)} images per process ({e}). Use a smaller "
                        "--batch-size (it is the global batch), --image-size or finetune:last=N."
                    ) from e
                chunks = _split_after_oom(e, optimizer, x, chunks, device)
        if (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader):
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total_loss, correct, seen = total_loss + loss * len(y), correct + int((logits.argmax(1) == y).sum()), seen + len(y)
    if replicas:
        total_loss, correct, seen = replicas.sum(total_loss, correct, seen)
    return total_loss / max(1, seen), correct / max(1, seen)


def forward_backward(
    model: nn.Module,
    loss_fn,
    x: torch.Tensor,
    y: torch.Tensor,
    chunks: int,
    accumulate: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, float]:
    """Logits and mean loss of one batch computed in `chunks` pieces; the gradients add up to the whole batch's."""
    outs, total = [], 0.0
    for xs, ys in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
        with autocast(device, dtype):
            logits = model(xs)
        loss = loss_fn(logits.float(), ys)
        (loss * (len(ys) / len(y) / accumulate)).backward()
        outs.append(logits.detach())
        total += float(loss.detach()) * len(ys)
    return torch.cat(outs), total / len(y)


def _split_after_oom(error: Exception, optimizer, x: torch.Tensor, chunks: int, device: torch.device) -> int:
    """Out of device memory: drop this step's partial gradients and compute each batch in twice as many pieces."""
    if len(x) // chunks <= 1:
        raise ResourceError(
            f"Out of {device} memory with a single image per step ({error}). Use a smaller "
            "--image-size, --strategy finetune:last=N with a smaller N, or another backbone."
        ) from error
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.warning(
        "%s out of memory at %d images per pass: retrying in pieces of %d (same batch, gradients accumulated)",
        device,
        math.ceil(len(x) / chunks),
        math.ceil(len(x) / (2 * chunks)),
    )
    return chunks * 2
