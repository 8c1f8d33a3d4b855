"""Parameter-efficient fine-tuning: LoRA adapters on a backbone's attention and MLP projections, via peft.

LoRA (Hu et al. 2021) keeps every pretrained weight W frozen and learns a
low-rank update (alpha / r) B A on chosen Linear layers. B starts at zero, so
the adapted network starts exactly as the pretrained one and the probe's head
stays valid. The layers adapted are the Linear layers inside the backbone's
blocks, which for a transformer are its attention (query/key/value/output)
and MLP projections; embeddings and the head are not adapted (the head trains
fully). For the `lora` strategy the backbone's blocks become the adapter
parameters of each original block, so the engine's freezing and learning-rate
machinery runs unchanged: "all blocks train" means "all adapters train".

A run directory keeps the adapters (peft's ``adapter/``) and, for loading and
export, the model with the adapters merged into its weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from transferkit.backbones.base import Block
from transferkit.errors import UsageError

LORA_RANK = 8  # r: the update's rank; 8 is peft's default and what the LoRA paper found enough for GLUE
LORA_ALPHA = 16  # the update is scaled by alpha / r = 2
ADAPTER_DIR = "adapter"
_PREFIX = "base_model.model."  # what peft's wrapper puts before the wrapped model's parameter names


def lora_targets(bb) -> list[str]:
    """Module names of the Linear layers inside `bb`'s blocks (a transformer's attention and MLP projections).

    Raises:
        UsageError: the backbone has none (e.g. a CNN), so LoRA has nothing to adapt.
    """
    in_blocks = {n for b in bb.blocks for n in b.param_names}
    targets = [name for name, m in bb.model.named_modules() if isinstance(m, nn.Linear) and f"{name}.weight" in in_blocks]
    if not targets:
        raise UsageError(
            f"Strategy 'lora' adapts the Linear layers of a transformer's blocks; '{bb.spec.name}' has none "
            "(a convolutional network?). Use finetune:last=N for it, or a transformer (vit_*, deit_*, a "
            "text encoder)."
        )
    return targets


def is_adapted(model: nn.Module) -> bool:
    """True for a model wrapped by peft with adapters."""
    return hasattr(model, "peft_config")


def saved_with_adapters(state: dict) -> bool:
    """True for a state dict taken from a model wrapped with adapters (its names carry peft's prefix)."""
    return any(k.startswith(_PREFIX) and ".lora_" in k for k in state)


def add_adapters_(bb, rank: int = LORA_RANK, alpha: int = LORA_ALPHA) -> list[str]:
    """Wrap `bb.model` with LoRA adapters (idempotent); its blocks become the adapters, block by block.

    Afterwards only adapters and the head can train (`set_trainable_` picks among them); returns the adapted layers.
    """
    if is_adapted(bb.model):
        return list(bb.model.peft_config["default"].target_modules)
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(bb)
    bb.model = get_peft_model(bb.model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none"))
    bb.head_param_names = tuple(_PREFIX + n for n in bb.head_param_names)
    adapters = [n for n, _ in bb.model.named_parameters() if ".lora_" in n]
    blocks = []
    for block in bb.blocks:
        own = set(block.param_names)
        names = tuple(n for n in adapters if n[len(_PREFIX) :].split(".lora_")[0] + ".weight" in own)
        if names:
            blocks.append(Block(f"{block.name} (lora)", names))
    bb.blocks = blocks
    return targets


def merged_copy(model: nn.Module) -> nn.Module:
    """The model with its adapters folded into the weights, as the plain architecture (the original is kept)."""
    return copy.deepcopy(model).merge_and_unload() if is_adapted(model) else model


def save_adapters(model: nn.Module, folder: Path) -> None:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) for a model with adapters."""
    model.save_pretrained(str(folder))
