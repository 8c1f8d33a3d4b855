"""One training loop that runs any strategy's phases.

Devices, mixed precision, the optimizer with per-group learning-rate scales,
warmup + cosine schedule, early stopping with best-weights restore, progress.
A phase on cached features and a phase on images go through the same loop:
only the module and the data loader differ.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from transferkit.distributed import Replicas
from transferkit.errors import ResourceError, UsageError

console = Console(stderr=True, soft_wrap=True)

# --------------------------------------------------------------------------- devices and precision


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available here. Use --device cpu or auto.")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got '{device}'.")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype to use, or None for plain fp32.

    'auto' is bf16 on CUDA cards that have it (fp16 on older ones). On CPUs with
    native bf16 (AVX512-BF16/AMX) it is bf16 for feature extraction and
    prediction (about 4x faster for EfficientNet-Lite0) but fp32 for training:
    there bf16 backward is slower (112 vs 172 img/s fine-tuning EfficientNet-Lite0
    at 64 px on 2 cores; its depthwise-conv gradients have no fast bf16 kernel).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got '{precision}'.")
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() and not training else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and Python; returns a generator for data order."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr; disabled (silent) when `enabled` is False."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True, disable=not enabled)


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Training settings shared by every strategy. None means 'the strategy's default'."""

    epochs: int | None = None  # fine-tuning epochs (image phases)
    head_epochs: int | None = None  # AdamW epochs of the head on cached features; None = L-BFGS probe
    lr: float | None = None  # head learning rate; None = FINETUNE_LR on images, HEAD_LR on features
    backbone_lr_scale: float = 0.3  # top trainable block's lr relative to the head's
    layer_decay: float = 0.8  # each block further down: lr * layer_decay
    weight_decay: float = 0.01  # AdamW's decoupled decay, per step times lr
    optimizer: str = "adamw"
    class_weights: str | None = None  # "auto": inverse class frequency in the loss
    batch_size: int = 32  # fine-tuning batch; 32 gives 40 steps/epoch on the digits demo
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None disables
    accumulate: int = 1  # gradient accumulation steps
    patience: int | None = None  # early stopping on val accuracy; None = run all epochs
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None  # data loader processes; None = automatic
    augment: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


HEAD_LR = 3e-3  # AdamW on pooled features: converges within 30 epochs on every backbone tried
# Fine-tuning: the head at 1e-3, the top block at 3e-4 (backbone_lr_scale), decaying 0.8 per
# block going down (the stem gets 6e-5). Pretrained blocks need less than a new head; one
# rate of 1e-3 everywhere is what collapses small-data runs (digits at 10/class: 81% -> 50%).
FINETUNE_LR = 1e-3


# --------------------------------------------------------------------------- the loop


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


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(groups: list[dict], weight_decay: float, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or SGD with Nesterov momentum) over param groups; each group's 'lr' is already scaled for its block."""
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
        g["initial_lr"] = g["lr"]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got '{kind}'.")


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch of (inputs, labels, ...) in `loader`, in order."""
    was_training = model.training
    model.eval()
    out, labels = [], []
    for batch in loader:
        x, y = batch[0].to(device), batch[1]
        with autocast(device, dtype):
            out.append(model(to_channels_last(x)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    if not out:  # an empty shard: more processes than images
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def rng_state(loader_generator: torch.Generator | None) -> dict:
    """Every random state a resumed run needs to continue exactly (tensors and plain tuples only)."""
    import random

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "loader": loader_generator.get_state() if loader_generator is not None else None,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


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


def run_phase(model: nn.Module, groups: list[dict], train_loader, val_loader, *, epochs: int, cfg: TrainConfig,
              device: torch.device, dtype: torch.dtype | None, name: str, warmup_epochs: float = 0.0,
              on_epoch_start: Callable[[int], None] | None = None, train_mode: Callable[[], None] | None = None,
              on_epoch_end: Callable[[dict], None] | None = None, resume: dict | None = None,
              class_weights: torch.Tensor | None = None, progress: bool = True,
              replicas: Replicas | None = None) -> PhaseResult:
    """Train `model` for `epochs`, keep the weights with the best validation accuracy.

    Args:
        groups: optimizer param groups with their own 'lr' (layer-wise decay already applied).
        on_epoch_start: called with the epoch index before it runs (gradual unfreezing).
        train_mode: puts the model in training mode; strategies use it to keep
            frozen blocks' BatchNorm in eval mode. Default: `model.train()`.
        on_epoch_end: receives the loop state after each epoch (to write a checkpoint).
        resume: a loop state from `on_epoch_end` to continue from, exactly.
        replicas: several processes train together (DDP): the training pass runs through
            `replicas.wrap(model)`, the loaders hold this process's share and metrics are
            summed across processes. `model` itself stays bare (checkpoints, best weights).
    """
    result = PhaseResult(name)
    optimizer = make_optimizer(groups, cfg.weight_decay, cfg.optimizer)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.accumulate))
    schedule = warmup_cosine(epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = make_loss(cfg, class_weights)
    generator = getattr(train_loader, "generator", None)
    best_state, since_best, first = None, 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state_(resume["rng"], generator)
        best_state, since_best, first = resume["best_state"], resume["since_best"], resume["epoch"]
        result.history, result.best_val_acc, result.best_epoch = resume["history"], resume["best_val_acc"], resume["best_epoch"]
    start = time.perf_counter()
    with make_progress(progress) as bar:
        task = bar.add_task(f"{name}", total=epochs, completed=first, info="")
        for epoch in range(first, epochs):
            if cfg.patience is not None and since_best >= cfg.patience:
                break  # early-stopped before an interruption
            if on_epoch_start:
                on_epoch_start(epoch)
            if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
                train_loader.sampler.set_epoch(epoch)  # DistributedSampler: the order depends on seed and epoch
            t0 = time.perf_counter()
            train_loss, train_acc = train_epoch(replicas.wrap(model) if replicas else model, train_loader, optimizer,
                                                scheduler, loss_fn, cfg, device, dtype, train_mode, replicas)
            val_acc = validation_accuracy(model, val_loader, device, dtype, replicas)
            result.history.append({"phase": name, "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                                   "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                                   "seconds": round(time.perf_counter() - t0, 3)})
            if val_acc > result.best_val_acc:
                result.best_val_acc, result.best_epoch, since_best = val_acc, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            bar.update(task, advance=1, info=f"loss {train_loss:.3f} val {val_acc:.3f}")
            if on_epoch_end:
                on_epoch_end({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "rng": rng_state(generator), "best_state": best_state,
                              "since_best": since_best, "history": result.history, "best_val_acc": result.best_val_acc,
                              "best_epoch": result.best_epoch})
            if cfg.patience is not None and since_best >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result


def validation_accuracy(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
                        replicas: Replicas | None = None) -> float:
    """Accuracy over `loader`; with `replicas`, over every process's share of the validation set."""
    logits, y = predict_logits(model, loader, device, dtype)
    correct, total = (int((logits.argmax(1) == y).sum()) if len(y) else 0), len(y)
    if replicas:
        correct, total = replicas.sum(correct, total)
    return correct / max(1, total)


def train_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, cfg: TrainConfig, device: torch.device,
                dtype: torch.dtype | None, train_mode: Callable[[], None] | None = None,
                replicas: Replicas | None = None) -> tuple[float, float]:
    """One pass over `loader` with gradient accumulation and clipping; returns (loss, accuracy).

    With `replicas` the loss and accuracy are over the images of every process.
    """
    if train_mode:
        train_mode()
    else:
        model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total_loss, correct, seen = 0.0, 0, 0
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
                    raise ResourceError(f"Out of {device} memory at {len(x)} images per process ({e}). Use a smaller "
                                        "--batch-size (it is the global batch), --image-size or finetune:last=N.") from e
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


def forward_backward(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, chunks: int, accumulate: int,
                     device: torch.device, dtype: torch.dtype | None) -> tuple[torch.Tensor, float]:
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
        raise ResourceError(f"Out of {device} memory with a single image per step ({error}). Use a smaller "
                            "--image-size, --strategy finetune:last=N with a smaller N, or another backbone.") from error
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    console.print(f"[yellow]{device} out of memory at {math.ceil(len(x) / chunks)} images per pass: retrying in "
                f"pieces of {math.ceil(len(x) / (2 * chunks))} (same batch, gradients accumulated)[/]")
    return chunks * 2


# --------------------------------------------------------------------------- the linear probe

# L2 strengths tried for the probe, as sklearn's C = 1 / (lambda * n): 1e-3 .. 1e3 in 13 steps.
PROBE_C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 13))


def fit_linear_probe(head: nn.Linear, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                     *, c_grid: Iterable[float] = PROBE_C_GRID, max_iter: int = 300, progress: bool = True,
                     name: str = "head") -> PhaseResult:
    """Fit `head` as L2-regularised multinomial logistic regression on features, C chosen on validation.

    The Kornblith et al. (2019) / CLIP linear-probe protocol: full-batch L-BFGS
    per C, warm-started from the previous C, keep the C with the best
    validation accuracy. Same objective as scikit-learn's LogisticRegression,
    so the probe matches it (the test checks within 0.5 point).
    """
    x, y = train[0].float(), train[1].long()
    xv, yv = val[0].float(), val[1].long()
    weight = torch.zeros(head.out_features, head.in_features, requires_grad=True)
    bias = torch.zeros(head.out_features, requires_grad=True)
    result, best, start = PhaseResult(name), None, time.perf_counter()
    grid = sorted(c_grid)
    with make_progress(progress) as bar:
        task = bar.add_task(name, total=len(grid), info="")
        for c in grid:
            lam = 1.0 / (c * len(y))  # sklearn: C * sum(loss) + 0.5 ||w||^2  ==  mean(loss) + lam/2 ||w||^2
            opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                    tolerance_grad=1e-6, line_search_fn="strong_wolfe")

            def closure(opt=opt, lam=lam):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * lam * weight.pow(2).sum()
                loss.backward()
                return loss

            loss = float(opt.step(closure).detach())
            with torch.no_grad():
                train_acc = float(((x @ weight.T + bias).argmax(1) == y).float().mean())
                val_acc = float(((xv @ weight.T + bias).argmax(1) == yv).float().mean())
            result.history.append({"phase": name, "epoch": len(result.history) + 1, "train_loss": loss,
                                   "train_acc": train_acc, "val_acc": val_acc, "C": c})
            if val_acc > result.best_val_acc:
                result.best_val_acc, result.best_epoch = val_acc, len(result.history)
                best = (weight.detach().clone(), bias.detach().clone())
            bar.update(task, advance=1, info=f"C={c:g} val {val_acc:.3f}")
    with torch.no_grad():
        head.weight.copy_(best[0])
        head.bias.copy_(best[1])
    result.seconds = time.perf_counter() - start
    return result
