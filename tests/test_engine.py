"""The loop itself: out-of-memory recovery and the warmup-cosine schedule."""

import copy
import logging

import pytest
import torch
from torch import nn

from transferkit.training.config import TrainConfig
from transferkit.training.loop import make_loss, make_optimizer, train_epoch, warmup_cosine


class SmallMemory(nn.Module):
    """Stands in for a GPU with little memory (none is lent here): torch's real OutOfMemoryError above `limit` images."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.inner(x)


def _train(model, limit=None):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.arange(32) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    net = SmallMemory(model, limit) if limit else model
    opt = make_optimizer([{"params": list(model.parameters())}], lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    cfg = TrainConfig(grad_clip=None)
    return train_epoch(net, loader, opt, sched, make_loss(cfg), cfg, torch.device("cpu"), None)


def test_out_of_memory_splits_the_batch_and_trains_the_same(caplog, monkeypatch):
    # The CLI, run in-process by other tests, stops transferkit's logger propagating; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("transferkit"), "propagate", True)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    whole, split = copy.deepcopy(base), copy.deepcopy(base)
    loss_whole, acc_whole = _train(whole)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        loss_split, acc_split = _train(split, limit=5)
    assert loss_split == pytest.approx(loss_whole, rel=1e-5) and acc_split == acc_whole
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    log = caplog.text
    assert "out of memory at 16 images per pass: retrying in pieces of 8" in log and "pieces of 4" in log


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0, abs=1e-9)
