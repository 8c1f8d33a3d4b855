"""The frozen prefix: a backbone cut below its trainable blocks, so their input can be cached.

Both halves are torch.fx GraphModules that share the model's own parameters,
so training the suffix trains the model.
"""

from __future__ import annotations

from torch import nn

from transferkit.backbones.base import Backbone, NoPrefix, PrefixSplit, block_modules


def split_frozen_prefix(bb: Backbone, top_blocks: int) -> PrefixSplit | NoPrefix:
    """Split `bb.model` where its frozen blocks end, or say why it cannot be split.

    The graph comes from torch.fx with timm's own leaf modules and functions
    (those timm's FX feature extraction uses). Nodes that depend on the input
    and on no trainable module form the prefix; it must hand exactly one
    tensor to the rest (true at block boundaries of ResNets, EfficientNets,
    ViTs), else the model is left whole.
    """
    if not 0 < top_blocks < len(bb.blocks):
        return NoPrefix("nothing is frozen" if top_blocks >= len(bb.blocks) else "every block is frozen")
    from torch import fx

    try:
        graph = _trace(bb.model)
    except Exception as e:  # data-dependent control flow: fx cannot trace every model
        return NoPrefix(f"torch.fx cannot trace {bb.spec.arch} ({type(e).__name__})")
    trainable = [m for b in bb.blocks[len(bb.blocks) - top_blocks :] for m in block_modules(b.param_names)]
    trainable += block_modules(bb.head_param_names)
    part = _partition(list(graph.nodes), trainable)
    crossing = [n for n in graph.nodes if part[n] == 0 and any(part[u] == 1 for u in n.users)]
    if len(crossing) != 1:
        return NoPrefix(f"{len(crossing)} values cross the cut of {bb.spec.arch} below block {bb.blocks[-top_blocks].name}")
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
        return node.op in ("call_module", "get_attr") and any(node.target == m or node.target.startswith(m + ".") for m in trainable)

    tainted, from_input = {}, {}
    for node in nodes:
        tainted[node] = owned(node) or any(tainted[d] for d in node.all_input_nodes)
        from_input[node] = node is nodes[0] or any(from_input[d] for d in node.all_input_nodes)
    part = {}
    for node in reversed(nodes):
        frozen_input = from_input[node] and not tainted[node]
        frozen_constant = not from_input[node] and not tainted[node] and node.op != "output" and any(part[u] == 0 for u in node.users)
        part[node] = 0 if frozen_input or frozen_constant else 1
    return part
