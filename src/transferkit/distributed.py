"""The process group: several processes training one model with PyTorch's DistributedDataParallel.

Launched by torchrun, which starts the processes and sets RANK, WORLD_SIZE and
LOCAL_RANK in each::

    torchrun --nproc_per_node 4 -m transferkit fit data/plants --out runs/plants

Each process joins the group (NCCL with one GPU each, ``cuda:LOCAL_RANK``;
gloo on CPU) and runs the same fit on the same split, seeded alike:

* training batches: ``--batch-size`` is the global batch; each process takes
  ``batch_size // world_size`` images of it through a `DistributedSampler`,
  whose seeded permutation is the same one a single process uses, so the
  processes' i-th batches together are exactly the single process's i-th batch;
* gradients are averaged by DDP; validation and training metrics are sums over
  every process's shard (`Replicas.sum`), so early stopping and the best
  epoch are decided alike everywhere; test logits are gathered (`gather_rows`);
* feature extraction is sharded: each process extracts a contiguous share into
  the same cache entry (see `transferkit.cache.features.cached_features`);
* the probe and other small deterministic steps run on rank 0 and are
  broadcast (`on_main`); only rank 0 writes checkpoints and the run directory
  and shows progress.

Without torchrun, or with a single process, none of this runs: no process
group is created and every helper here returns its input.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from transferkit.errors import UsageError

T = TypeVar("T")


def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return dist.is_available() and dist.is_torchelastic_launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def refuse_torchrun(command: str) -> None:
    """Stop a command that runs in one process when torchrun started several (each would write the same files).

    Raises:
        UsageError: this process was launched by torchrun with more than one process.
    """
    if launched():
        raise UsageError(
            f"`transferkit {command}` runs in one process; only `fit` is distributed. Run it without torchrun (or with --nproc_per_node 1)."
        )


def active() -> bool:
    """True when this process is in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank: from the group, else from torchrun's environment (0 when not launched)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """True in the one process that writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return the device this process trains on.

    NCCL when `device` is CUDA, each process on ``cuda:LOCAL_RANK``; gloo otherwise.
    The group is destroyed when the process exits, also after an error. A group
    the caller already initialised is used as it is. Outside torchrun: returns `device`.

    Raises:
        UsageError: a device that cannot be shared out by LOCAL_RANK (cuda:N, mps, too few GPUs).
    """
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(
                f"--device {device} names one GPU, but under torchrun each process takes the GPU of its "
                "LOCAL_RANK. Pass --device cuda (or auto); choose GPUs with CUDA_VISIBLE_DEVICES."
            )
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun started process LOCAL_RANK={local}, but this node has only "
                f"{torch.cuda.device_count()} GPU(s). Use --nproc_per_node {torch.cuda.device_count()}."
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(
            f"Distributed training runs on CUDA (NCCL) or CPU (gloo); got --device {device}. Pass --device cuda or --device cpu."
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        atexit.register(leave)
    return device


def leave() -> None:
    """Destroy the process group if there is one (registered to run at exit by `join`)."""
    if dist.is_available() and dist.is_initialized():
        with suppress(Exception):  # exiting anyway, e.g. after a peer died: nothing left to clean
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, a cache fill), then the others; a no-op in one process."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def sum_(*values: float) -> tuple[float, ...]:
    """Each value summed over every process (float64: counts stay exact); the values themselves in one process."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tuple(t.tolist())


def all_true(flag: bool) -> bool:
    """True when `flag` holds in every process."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every process its return value (or raise its error everywhere)."""
    if not active():
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value  # the same error type everywhere, so every process exits alike
    return value


def shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous rows of `n` that a process handles; the shards cover range(n) once, in rank order."""
    r, w = (rank() if rank_ is None else rank_), (world_size() if world is None else world)
    return range(n * r // w, n * (r + 1) // w)


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's `rows` stacked in rank order (each process gets all); `rows` itself in one process."""
    if not active():
        return rows
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, rows)
    return np.concatenate([p for p in parts if len(p)])  # an empty shard's (0, 0) would not stack


def local_batch(batch_size: int, world: int | None = None) -> int:
    """This process's share of the global `batch_size`.

    Raises:
        UsageError: `batch_size` is not a multiple of the number of processes.
    """
    w = world_size() if world is None else world
    if batch_size % w:
        lower, upper = batch_size // w * w, -(-batch_size // w) * w
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must split evenly over the {w} processes; use {lower or w} or {upper}."
        )
    return batch_size // w


def train_sampler(n: int, seed: int, rank_: int | None = None, world: int | None = None) -> torch.utils.data.DistributedSampler:
    """A seeded shuffle of range(n), its rank-`rank_` share; call `set_epoch(epoch)` before each epoch.

    One process uses it too (world 1), so a run's data order depends on seed and epoch
    only, not on the number of processes: rank r takes positions r, r + W, ... of the
    permutation, so the W processes' i-th batches of B/W images are the i-th batch of B.
    The permutation is cut to a multiple of W (drop_last) so that every process gets as
    many batches and no image counts twice.
    """
    return torch.utils.data.DistributedSampler(
        range(n),  # type: ignore[arg-type]  # torch annotates Dataset; the sampler only takes len() of it
        num_replicas=world_size() if world is None else world,
        rank=rank() if rank_ is None else rank_,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )


class Replicas:
    """The training pass of one phase under DDP, and its metric sums across processes.

    `wrap` gives DistributedDataParallel around the model, rebuilt when its set of
    trainable parameters changes (gradual unfreezing): DDP's reducer covers the
    parameters that require grad when it is built. The wrapper shares the model's
    parameters; checkpoints and the best weights are taken from the bare model, so
    they hold the same names at any number of processes.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._trainable: Sequence[bool] = ()

    @staticmethod
    def create(device: torch.device) -> Replicas | None:
        """Replicas when several processes train together, else None (plain single-process training)."""
        return Replicas(device) if active() else None

    def wrap(self, model: nn.Module) -> nn.Module:
        trainable = [p.requires_grad for p in model.parameters()]
        if self._ddp is None or self._ddp.module is not model or trainable != self._trainable:
            ids = [self.device] if self.device.type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            self._trainable = trainable
        return self._ddp

    @staticmethod
    def sum(*values: float) -> tuple[float, ...]:
        return sum_(*values)
