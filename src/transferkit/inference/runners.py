"""Engines for frozen forward passes: torch (autocast, channels_last) or OpenVINO, the CPU's own speed.

Frozen, deterministic work (feature extraction, the frozen-prefix cache, predict,
evaluate, compare's test passes) needs no autograd, so on a CPU it can run in
OpenVINO, whose kernels use the CPU's bf16 units (AMX, AVX512-BF16) for
depthwise convolutions too; torch's bf16 autocast does not. One function gives
a callable for either engine:

    >>> run, info = frozen_runner(model, (3, 224, 224), device=torch.device("cpu"),
    ...                           precision=torch.bfloat16)          # doctest: +SKIP
    >>> run(batch).shape, info.name, info.precision                  # doctest: +SKIP
    (torch.Size([32, 1000]), 'openvino', 'bf16')

``engine="auto"`` is OpenVINO on the CPU when the package is installed and the
model converts, torch elsewhere (CUDA, MPS) and whenever conversion fails (the
reason is logged on one line and kept in :class:`EngineInfo`). OpenVINO runs bf16
where the CPU has native bf16 and the precision asks for it, f32 otherwise.

The converted model (the graph and its f32 weights, before compilation) is
cached on disk under ``TRANSFERKIT_CACHE/openvino/<key>``, with the feature
cache's rules: the key covers the OpenVINO version, the conversion route, the
module's structure and a digest of its weights, the cut and the input shape; an
entry is written to a temporary folder and renamed into place (atomic), verified
by sha256 on read and reconverted when corrupt. It is compiled once per run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from transferkit.atomic import pid_alive, sha256_file
from transferkit.errors import UsageError, check_choice
from transferkit.inference.settings import ENGINES

log = logging.getLogger(__name__)

ROUTES = ("direct", "onnx")
# ov.convert_model on the module (TorchScript trace) vs torch.onnx.export(dynamo=True) read by OpenVINO:
# benchmarks/extraction_throughput.py measures both. EfficientNet-Lite0 bf16, 224 px, on the Xeon (AMX) here:
# direct 528 vs onnx 322 img/s at load ~1, 124 vs 149 at load ~5.7 (noise of a shared machine); direct
# converts in a third of the time (2.5 vs 7.3 s), and conversion is what a cold-cache fit pays, so direct it is.
ROUTE = "direct"
FORMAT = 1  # of a converted-model cache entry
STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class EngineInfo:
    """Which engine runs a frozen pass, at what precision (``bf16``, ``fp16``, ``fp32``), and why."""

    name: str
    precision: str
    reason: str = ""

    @property
    def cache_tag(self) -> str:
        """The precision field of a feature-cache key: torch keeps its autocast dtype's name, as before engines."""
        if self.name == "torch":
            return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.precision]
        return f"{self.name}-{self.precision}"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the torch path's pieces


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# --------------------------------------------------------------------------- choosing


def check_engine(engine: str) -> str:
    return check_choice("engine", engine, ENGINES)


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def plan_engine(engine: str, device: torch.device, precision: torch.dtype | None, *, image_input: bool = True) -> EngineInfo:
    """The engine `frozen_runner` will try, decided without converting anything (conversion may still fall back).

    Raises:
        UsageError: ``engine="openvino"`` on a device other than the CPU, or without the openvino package.
    """
    check_engine(engine)
    torch_info = EngineInfo("torch", precision_name(precision))
    if engine == "torch":
        return EngineInfo("torch", torch_info.precision, "engine=torch was asked for")
    if device.type != "cpu":
        if engine == "openvino":
            raise UsageError(
                f"engine=openvino (--engine openvino) runs on the CPU; the device is {device}. "
                f"Use --device cpu, or --engine auto (torch on {device.type})."
            )
        return EngineInfo("torch", torch_info.precision, f"torch on {device.type}")
    if not openvino_installed():
        if engine == "openvino":
            raise UsageError("engine=openvino (--engine openvino) needs the openvino package: pip install openvino.")
        return EngineInfo("torch", torch_info.precision, "openvino is not installed (pip install openvino)")
    if not image_input:
        return EngineInfo("torch", torch_info.precision, "OpenVINO runs image backbones here; these inputs are not images")
    if precision == torch.float16:
        return EngineInfo("torch", "fp16", "fp16 was asked for; OpenVINO on the CPU runs bf16 or fp32")
    native = precision == torch.bfloat16 and cpu_supports_bf16()
    return EngineInfo("openvino", "bf16" if native else "fp32", "OpenVINO on the CPU")


def frozen_runner(
    model_or_cut,
    example_input_shape: Sequence[int],
    *,
    device: torch.device,
    precision: torch.dtype | None,
    engine: str = "auto",
    cache_root: Path | None = None,
    route: str = ROUTE,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], EngineInfo]:
    """A callable for frozen forward passes (a batch in, a float32 tensor on `device` out) and what runs it.

    Args:
        model_or_cut: an ``nn.Module``, or an ``inference.Cut`` (its `fn`, converted through its `module`).
        example_input_shape: one input's shape, (C, H, W); the batch size stays free.
        device: where the inputs go; OpenVINO only on the CPU.
        precision: the autocast dtype of the torch path (None = fp32); bf16 becomes OpenVINO's bf16 where
            the CPU has native bf16, f32 otherwise.
        engine: ``auto`` (OpenVINO on the CPU when installed and it converts, else torch), ``torch``, ``openvino``.
        cache_root: the converted models' folder (default: TRANSFERKIT_CACHE/openvino); None entries are kept there.
        route: ``direct`` (ov.convert_model on the module) or ``onnx`` (an in-memory torch.onnx export).

    Returns:
        (run, EngineInfo(name, precision, reason)). A failed conversion returns the torch runner, with the
        failure as the reason (also logged as one warning line).
    """
    fn, module, cut_name, unused = _unpack(model_or_cut)
    info = plan_engine(engine, device, precision, image_input=len(example_input_shape) == 3)
    if info.name == "openvino" and module is None:
        info = EngineInfo("torch", precision_name(precision), "the cut names no module to convert")
    if info.name == "torch" or module is None:  # (no module: the line above made it torch)
        return torch_runner(fn, device, precision), info
    check_choice("route", route, ROUTES)
    try:
        key = model_key(module, cut_name, tuple(example_input_shape), route, unused)
        compiled, actual = _compile(module, fn, key, tuple(example_input_shape), info.precision, route, cache_root or default_root())
    except Exception as e:  # any conversion failure: unsupported op, tracing error, ...
        reason = f"OpenVINO could not convert the model ({conversion_failure(e)}); torch runs it"
        log.warning(reason)
        return torch_runner(fn, device, precision), EngineInfo("torch", precision_name(precision), reason)
    return openvino_runner(compiled), EngineInfo("openvino", actual, info.reason)


def _unpack(model_or_cut) -> tuple[Callable, nn.Module | None, str, tuple[str, ...]]:
    if isinstance(model_or_cut, nn.Module):
        return model_or_cut, model_or_cut, "module", ()
    return model_or_cut.fn, getattr(model_or_cut, "module", None), model_or_cut.name, getattr(model_or_cut, "unused", ())


def torch_runner(
    fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, precision: torch.dtype | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn under autocast on channels_last inputs (the torch path of extraction and prediction)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return fn(to_channels_last(x.to(device))).float()

    return run


def openvino_runner(compiled) -> Callable[[torch.Tensor], torch.Tensor]:
    """One infer request of a compiled model: a CPU tensor batch in, a float32 tensor out."""
    import numpy as np

    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: np.ascontiguousarray(x.detach().cpu().float().numpy())})  # outputs are copies
        return torch.from_numpy(out.to_tuple()[0])

    return run


def conversion_failure(e: BaseException) -> str:
    """One line for a conversion error: the unconverted operations when OpenVINO lists them, else its first line."""
    text = str(e)
    ops = sorted({w.strip(",.:;") for w in text.split() if w.startswith(("aten::", "prim::", "onnx::"))})
    if ops:
        return f"{type(e).__name__}: unsupported {', '.join(ops[:5])}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:200]}"


# --------------------------------------------------------------------------- converting and caching


def default_root() -> Path:
    from transferkit.data.named import cache_dir

    return cache_dir() / "openvino"


def model_key(module: nn.Module, cut_name: str, input_shape: tuple[int, ...], route: str, unused: Sequence[str] = ()) -> str:
    """A hex key that changes with what the converted graph depends on: the OpenVINO version, the route, the cut, the
    input shape, and the module's structure and weights.

    Parameters in `unused` (those the cut never reads, such as the head under pooled features) are left out, and so
    are the submodules that hold only those (the head's class count): a trained or recalibrated head, or a dataset
    with another number of classes, does not cost a new conversion of the same backbone. (The precision is not in the
    key: it is chosen when the cached model is compiled.)
    """
    import openvino

    h = hashlib.sha256()
    header = {
        "format": FORMAT,
        "openvino": openvino.__version__,
        "route": route,
        "cut": cut_name,
        "input": list(input_shape),
        "structure": structure_digest(module, unused),
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    skip = set(unused)
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        if name in skip:
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def structure_digest(module: nn.Module, unused: Sequence[str] = ()) -> str:
    """A digest of the module tree (each submodule's name, type and settings, as `repr` shows them), leaving out the
    submodules whose parameters are all in `unused`."""
    skip = set(unused)
    owners = {name.rpartition(".")[0] for name in skip}
    left_out = [
        name for name, sub in module.named_modules() if name in owners and all(f"{name}.{p}" in skip for p, _ in sub.named_parameters())
    ]
    lines = [
        f"{name}:{type(sub).__qualname__}({sub.extra_repr()})"
        for name, sub in module.named_modules()
        if not any(name == o or name.startswith(o + ".") for o in left_out)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _compile(module: nn.Module, fn: Callable, key: str, input_shape: tuple[int, ...], precision: str, route: str, root: Path):
    """The compiled model (converted or read from the cache under `key`) and the precision it actually runs at."""
    import openvino as ov

    model = read_cached(root, key)
    if model is None:
        started = time.perf_counter()
        model = convert(module, fn, input_shape, route)
        write_cached_(root, key, model)
        log.info(
            "OpenVINO: converted %s (%s route) in %.1f s; cached under %s",
            type(module).__name__,
            route,
            time.perf_counter() - started,
            root / key,
        )
    # No pinning: pinned OpenVINO threads slowed torch's work after it in the same process (the probe took
    # 1.7x as long after an OpenVINO pass), and on a shared machine a pinned core may be another job's.
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "ENABLE_CPU_PINNING": False}
    compiled = ov.Core().compile_model(model, "CPU", config)
    return compiled, "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "fp32"


class _Forward(nn.Module):
    """`fn` as a module that owns `module`, so tracing sees its parameters as the model's."""

    def __init__(self, fn: Callable, module: nn.Module):
        super().__init__()
        self.fn, self.owner = fn, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def convert(module: nn.Module, fn: Callable, input_shape: tuple[int, ...], route: str):
    """An ov.Model of fn(x) with a free batch size, straight from the module or through an in-memory ONNX export."""
    import openvino as ov

    was_training = module.training
    wrapped = _Forward(fn, module.eval()).eval()
    example = torch.zeros(2, *input_shape)  # batch 2: torch.export specialises a batch of 1
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # OpenVINO's direct route traces with torch.jit, which torch deprecates: not the user's concern
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.trace")
            if route == "direct":
                return ov.convert_model(wrapped, example_input=example, input=[ov.PartialShape([-1, *input_shape])])
            program = torch.onnx.export(wrapped, (example,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
            if program is None:  # only the legacy exporter (dynamo=False) returns None
                raise RuntimeError("torch.onnx.export returned no ONNX program")
            return ov.Core().read_model(program.model_proto.SerializeToString(), b"")
    finally:
        module.train(was_training)


def read_cached(root: Path, key: str):
    """The cached ov.Model for `key`, or None when absent or corrupt (which is removed)."""
    import openvino as ov

    folder = root / key
    if not folder.is_dir():
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("key") != key or any(manifest["sha256"][f] != sha256_file(folder / f) for f in ("model.xml", "model.bin")):
            raise ValueError("manifest does not match the files")
        return ov.Core().read_model(str(folder / "model.xml"))
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError):
        shutil.rmtree(folder, ignore_errors=True)
        return None


def write_cached_(root: Path, key: str, model) -> None:
    """Save `model` (f32 weights: no fp16 compression) under `root/key` atomically; a failure only logs."""
    import openvino as ov

    tmp = root / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp_(root)
        tmp.mkdir()
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        manifest = {
            "format": FORMAT,
            "key": key,
            "created": time.time(),
            "sha256": {f: sha256_file(tmp / f) for f in ("model.xml", "model.bin")},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, root / key)  # fails when another process committed the key first: theirs stays
    except OSError as e:
        log.info("OpenVINO: the converted model was not cached (%s); it will be converted again next run", e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp_(root: Path) -> None:
    """Temporary folders of killed conversions (their process gone, or over an hour old) are removed."""
    for tmp in root.glob(".tmp-*"):
        try:
            pid, age = int(tmp.name.split("-")[2]), time.time() - tmp.stat().st_mtime
        except (IndexError, ValueError, OSError):
            continue
        if pid != os.getpid() and (age > STALE_TMP_SECONDS or not pid_alive(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
