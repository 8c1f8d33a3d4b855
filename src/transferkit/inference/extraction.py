"""The engine for frozen work: devices and precision, and inference over a loader (extraction, prediction).

Everything here runs a model forward without training it: the pooled features
or a frozen prefix's outputs (a :class:`Cut`) for the feature cache, and the
logits for predict, evaluate and test passes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from transferkit.backbones.base import Backbone
from transferkit.data.examples import Examples
from transferkit.errors import ResourceError, UsageError, did_you_mean
from transferkit.inference.runners import EngineInfo, autocast, cpu_supports_bf16, frozen_runner, to_channels_last  # noqa: F401  (re-export)
from transferkit.inference.settings import PRECISIONS, check_device, default_engine
from transferkit.progress import make_progress

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- devices and precision


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable device is an error."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available here. Use --device cpu or auto.")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype to use, or None for plain fp32.

    'auto' is bf16 on CUDA cards that have it (fp16 on older ones). On CPUs with
    native bf16 (AVX512-BF16/AMX) it is bf16 for feature extraction and
    prediction (about 4x faster for EfficientNet-Lite0) but fp32 for training:
    there bf16 backward is slower (112 vs 172 img/s fine-tuning EfficientNet-Lite0
    at 64 px on 2 cores; its depthwise-conv gradients have no fast bf16 kernel).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got '{precision}'.{did_you_mean(precision, PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() and not training else None


# --------------------------------------------------------------------------- inference


MIN_OPENVINO_BATCHES = 2  # engine auto: a pass over fewer batches runs in torch (compiling costs more than it saves)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None, engine: str = "torch"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch of (inputs, labels, ...) in `loader`, in order.

    `engine` as in :func:`transferkit.inference.runners.frozen_runner`; the runner is built at the first batch, for its shape.
    """
    was_training = model.training
    model.eval()
    if engine == "auto" and isinstance(loader, Sized) and len(loader) < MIN_OPENVINO_BATCHES:
        engine = "torch"
    out, labels, run = [], [], None
    for batch in loader:
        x, y = batch[0], batch[1]
        if run is None:
            run, info = frozen_runner(model, tuple(x.shape[1:]), device=device, precision=dtype, engine=engine)
            log.debug("predict: %s %s (%s)", info.name, info.precision, info.reason)
        out.append(run(x).cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    if not out:  # an empty shard: more processes than images
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def predict_examples(
    bb: Backbone,
    examples: Examples,
    n_outputs: int,
    *,
    batch_size: int = 64,
    device: str | None = None,
    precision: str | None = None,
    engine: str = "torch",
) -> np.ndarray:
    """The logits of a fitted backbone for `examples`, in order: the backbone's own dataset and collate, then
    :func:`predict_logits` on the device and precision resolved from `device` and `precision` (None: auto)."""
    if len(examples) == 0:
        return np.zeros((0, n_outputs), np.float32)
    torch_device = resolve_device(device or "auto")
    dtype = resolve_precision(precision or "auto", torch_device)
    loader = torch.utils.data.DataLoader(
        bb.dataset(examples), batch_size=batch_size, num_workers=examples.loader_workers(), collate_fn=bb.collate
    )
    channels = torch.channels_last if dtype is not None else torch.preserve_format
    model = bb.model.to(torch_device, memory_format=channels)  # type: ignore[call-overload]  # Module.to takes memory_format; its stubs omit it
    return predict_logits(model, loader, torch_device, dtype, engine=engine)[0]


CUT_POINT = "pre_logits"  # pooled features, what the classifier head sees


@dataclass(frozen=True)
class Cut:
    """What the cache stores for each image: the output of `fn` (a frozen part of the model), `shape` per image.

    `name` goes into the cache key; it must change whenever `fn` computes something else.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]
    module: nn.Module | None = None  # the module owning fn's weights: what another engine converts
    unused: tuple[str, ...] = ()  # parameters of `module` fn never reads (the head): outside the engine's cache key

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def pooled_cut(backbone: Backbone) -> Cut:
    """The pooled pre-logits features, what the classifier head sees."""
    return Cut(CUT_POINT, backbone.features, (backbone.num_features,), backbone.model, tuple(backbone.head_param_names))


def prefix_cut(split, input_size: Sequence[int]) -> Cut:
    """The frozen prefix's output for images of `input_size` (C, H, W).

    Its cache name holds the cut, the output shape and a digest of the prefix's
    own parameters and buffers, so cached outputs never outlive the weights that made them.
    """
    h = hashlib.sha256()
    for name, t in sorted({**dict(split.prefix.named_parameters()), **dict(split.prefix.named_buffers())}.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    device = next(split.prefix.parameters()).device
    with torch.no_grad():
        shape = tuple(split.prefix.eval()(torch.zeros(1, *input_size, device=device)).shape[1:])
    return Cut(f"prefix:{split.cut}:{'x'.join(map(str, shape))}:{h.hexdigest()[:16]}", split.prefix, shape, split.prefix)


def input_shape(backbone: Backbone) -> tuple[int, ...]:
    """One input's shape for the engines: (C, H, W) for images, () when the inputs are not one tensor."""
    return tuple(backbone.data_config.get("input_size", ())) if backbone.modality == "image" else ()


def extract_features(
    backbone: Backbone,
    images: Examples,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int = 128,
    workers: int | None = None,
    out: np.ndarray | None = None,
    progress: bool = True,
    label: str = "features",
    cut: Cut | None = None,
    engine: str | None = None,
    runner: tuple[Callable, EngineInfo] | None = None,
) -> np.ndarray:
    """The `cut`'s output (default: pooled features) for every example, in order, flattened into `out` (float16).

    Examples go through the backbone's own preprocessing (`dataset`) and batching (`collate`); the
    forward runs in `runner` (a :func:`~transferkit.inference.runners.frozen_runner` result) or one made for `engine`.
    """
    cut = cut or pooled_cut(backbone)
    engine = engine or default_engine()
    model = backbone.model.to(device).eval()
    if device.type == "cpu" or dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        backbone.dataset(images),
        batch_size=batch_size,
        collate_fn=backbone.collate,
        num_workers=images.loader_workers() if workers is None else workers,
    )
    out = np.zeros((len(images), cut.size), np.float16) if out is None else out
    batches = iter(loader)  # decoding workers start now, so their first batches overlap a one-time conversion
    run, info = runner or frozen_runner(cut, input_shape(backbone), device=device, precision=dtype, engine=engine)
    start = 0
    # inference_mode only around the loop: converting the model inside it would turn its
    # parameters into inference tensors that fine-tuning can no longer train.
    with make_progress(progress) as bar, torch.inference_mode():
        task = bar.add_task(f"extract {label}", total=len(images), info=f"{info.name} {info.precision}")
        chunk = batch_size  # shrinks on GPU out-of-memory and stays shrunk
        for x, _, _ in batches:
            for i in range(0, len(x), chunk):
                f, chunk = _features_fitting_memory(run, x[i : i + chunk], device)
                out[start : start + len(f)] = f
                start += len(f)
            bar.update(task, advance=len(x))
    return out


def _features_fitting_memory(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device) -> tuple[np.ndarray, int]:
    """Features of one batch; on CUDA out-of-memory, halve the batch and retry (said in the log).

    Returns the features and the batch size that worked.
    """
    try:
        f = run(x)
        return f.cpu().reshape(len(x), -1).numpy().astype(np.float16), len(x)
    except torch.OutOfMemoryError as e:
        if len(x) == 1:
            raise ResourceError(
                f"Out of {device} memory with a single image ({e}). Use a smaller --image-size, another backbone or --device cpu."
            ) from e
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(x) // 2
        log.warning("%s out of memory at batch size %d: halving to %d and retrying", device, len(x), half)
        first, size = _features_fitting_memory(run, x[:half], device)
        rest = [_features_fitting_memory(run, x[i : i + size], device)[0] for i in range(half, len(x), size)]
        return np.concatenate([first, *rest]), size
