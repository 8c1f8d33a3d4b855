"""Freezing, BatchNorm policy and optimizer groups: small helpers usable on their own (Lightning-style).

Layer-wise learning rates are data: each group carries an `lr_scale` relative to
the head's rate, and :func:`transferkit.training.loop.make_optimizer` multiplies
it in, in one place. Following timm's ``param_groups_layer_decay``, 1-D
parameters (biases, norm scales and shifts) get no weight decay.
"""

from __future__ import annotations

from torch import nn

from transferkit.backbones.base import Backbone


def set_trainable_(bb: Backbone, top_blocks: int) -> list[str]:
    """Freeze everything, then unfreeze the head and the top `top_blocks` blocks; returns their names."""
    params = dict(bb.model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    chosen = bb.blocks[len(bb.blocks) - top_blocks :] if top_blocks > 0 else []
    for name in bb.head_param_names + tuple(n for b in chosen for n in b.param_names):
        params[name].requires_grad_(True)
    return [b.name for b in chosen]


def set_bn_modes_(bb: Backbone, policy: str) -> int:
    """Put BatchNorm layers of frozen blocks (or all, for 'all-frozen') in eval mode; returns how many.

    Call after `model.train()`: a frozen block keeps its running statistics
    fixed and normalises with them in training exactly as in evaluation, so
    there is no batch-stat / stored-stat mismatch and no drift.
    """
    n = 0
    for module in bb.model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
            if policy == "all-frozen" or frozen:
                module.eval()
                n += 1
    return n


def param_groups(bb: Backbone, top_blocks: int, backbone_lr_scale: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: the head at scale 1, the top block at `backbone_lr_scale`, each block below it
    multiplied by `layer_decay` once more (timm-style layer-wise decay).

    Every trainable parameter is in exactly one group. Groups carry 'name', 'lr_scale' and 'weight_decay'
    (0 for 1-D parameters: decaying a bias or a norm's scale only shrinks what normalisation undoes).
    """
    params = dict(bb.model.named_parameters())
    chosen = bb.blocks[len(bb.blocks) - top_blocks :] if top_blocks > 0 else []
    units = [("head", bb.head_param_names, 1.0)]
    units += [(b.name, b.param_names, backbone_lr_scale * layer_decay**depth) for depth, b in enumerate(reversed(chosen))]
    groups = []
    for name, names, scale in units:
        tensors = [params[n] for n in names]
        decay, no_decay = [p for p in tensors if p.ndim > 1], [p for p in tensors if p.ndim <= 1]
        groups += [
            {"name": name, "params": ps, "lr_scale": scale, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps
        ]
    return groups
