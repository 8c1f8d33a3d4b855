"""How close does extraction get to the hardware? Matmul peak vs achieved extraction GFLOP/s.

The ceiling: fp32 and bf16 square matmuls (2 n^3 FLOPs each; the faster is the peak), measured in this
run. The achieved: FLOPs per image counted by torch.utils.flop_counter
(convolutions and matmuls, 2 FLOPs per multiply-add) times the images/s of
transferkit's extraction step (bf16 autocast + channels_last, inference_mode,
ready tensors), and of each engine (torch's path and OpenVINO, transferkit.inference.runners)
for ResNet-18 at 224 px (random init: speed does not depend on the weights) and the
built-in EfficientNet-Lite0 (224 px and the demo's 64 px).

Run: python benchmarks/hardware_ceiling.py
"""

from __future__ import annotations

import os

import torch
from _common import goal, header, rate, table
from torch.utils.flop_counter import FlopCounterMode

from transferkit.backbones import load_backbone
from transferkit.inference.extraction import autocast, pooled_cut, resolve_precision, to_channels_last
from transferkit.inference.runners import cpu_supports_bf16, frozen_runner

MATMUL_N = 2048
SEED = 0


def matmul_gflops(dtype: torch.dtype, n: int = MATMUL_N) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / 1e9 * rate(lambda: torch.mm(a, b), 1, repeat=5, warmup=2)


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def extraction_rate(bb, size: int, batch: int, dtype: torch.dtype | None) -> float:
    """Images/s of transferkit's extraction step on ready tensors."""
    bb.model.eval().to(memory_format=torch.channels_last)  # in place, as extract_features does
    x = to_channels_last(torch.randn(batch, 3, size, size))

    def run() -> None:
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            bb.features(x)

    return rate(run, batch, repeat=3, warmup=1)


def openvino_rate(bb, size: int, batch: int, dtype: torch.dtype | None) -> float:
    """Images/s of the OpenVINO engine on ready tensors (0 when it fell back to torch)."""
    run, info = frozen_runner(pooled_cut(bb), (3, size, size), device=torch.device("cpu"), precision=dtype, engine="auto")
    if info.name != "openvino":
        return 0.0
    x = torch.randn(batch, 3, size, size)
    return rate(lambda: run(x), batch, repeat=3, warmup=1)


def plain_rate(bb, size: int, batch: int) -> float:
    """Images/s of a plain fp32 NCHW forward, for the fp32 fraction."""
    model = bb.model.eval().to(memory_format=torch.contiguous_format)
    x = torch.randn(batch, 3, size, size)

    def run() -> None:
        with torch.inference_mode():
            model.forward_head(model.forward_features(x), pre_logits=True)

    return rate(run, batch, repeat=3, warmup=1)


def main() -> None:
    header("hardware ceiling: matmul GFLOP/s vs extraction GFLOP/s")
    torch.manual_seed(SEED)
    # Without bf16 units torch emulates bf16 matmuls at a few GFLOP/s (minutes for this size): not a peak.
    fp32_peak, bf16_peak = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16) if cpu_supports_bf16() else 0.0
    table([f"matmul {MATMUL_N}x{MATMUL_N}", "GFLOP/s"], [["fp32", fp32_peak], ["bf16", bf16_peak]])
    peak = max(fp32_peak, bf16_peak)  # the CPU's matmul peak: bf16 where it has bf16 units, else fp32
    dtype = resolve_precision("auto", torch.device("cpu"))
    name = "fp32" if dtype is None else str(dtype)[6:]
    cases = [("resnet18", "none", 224, 32), ("builtin:efficientnet_lite0", None, 224, 32), ("builtin:efficientnet_lite0", None, 64, 128)]
    rows, fractions = [], {}
    for arch, weights, size, batch in cases:
        bb = load_backbone(arch, 1000, weights=weights)
        gflop = flops_per_image(bb.model.eval(), size) / 1e9
        fp32_rate = plain_rate(bb, size, batch)
        tk_rate = extraction_rate(bb, size, batch, dtype)
        ov_rate = openvino_rate(bb, size, batch, dtype)
        achieved = gflop * tk_rate
        fractions[(arch, size)] = (achieved / peak, gflop * ov_rate / peak)
        rows.append(
            [
                f"{arch} {size}px",
                gflop,
                fp32_rate,
                gflop * fp32_rate / fp32_peak,
                tk_rate,
                achieved,
                achieved / peak,
                ov_rate,
                gflop * ov_rate,
                gflop * ov_rate / peak,
            ]
        )
    table(
        [
            "model",
            "GFLOP/img",
            "fp32 img/s",
            "of fp32 peak",
            f"torch {name} img/s",
            "GFLOP/s",
            "of peak",
            "openvino img/s",
            "GFLOP/s",
            "of peak",
        ],
        rows,
    )
    print("(peak: the faster of the fp32 and bf16 matmuls in this run)")
    torch_frac, ov_frac = fractions[("resnet18", 224)]
    goal(
        ">= 50% of the matmul peak, ResNet-18 224 px extraction (best engine)",
        f"torch {100 * torch_frac:.0f}%, openvino {100 * ov_frac:.0f}%",
        max(torch_frac, ov_frac) >= 0.5,
    )


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
