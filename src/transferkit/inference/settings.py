"""Where and how frozen passes run: the engines, devices and precisions, validated without importing torch."""

from __future__ import annotations

import os

from transferkit.errors import UsageError, did_you_mean

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ENGINES = ("auto", "torch", "openvino")  # the engines of frozen passes (transferkit.inference.runners); no torch needed here
# auto: OpenVINO for frozen passes on the CPU when the openvino extra is installed (installing it is the opt-in), torch
# otherwise. A cold feature-extraction fit of digits at 224 px: 1.69-1.81x faster on an AVX2 EPYC (f32, same accuracy),
# 1.76x on an AMX Xeon (bf16); README, Performance. TRANSFERKIT_ENGINE names another default (the test suite pins torch).
DEFAULT_ENGINE = "auto"
ENGINE_VARIABLE = "TRANSFERKIT_ENGINE"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def default_engine() -> str:
    """The engine of frozen passes when none is given: $TRANSFERKIT_ENGINE, else DEFAULT_ENGINE.

    Raises:
        UsageError: the variable names no engine.
    """
    value = os.environ.get(ENGINE_VARIABLE, "").strip() or DEFAULT_ENGINE
    if value not in ENGINES:
        raise UsageError(
            f"{ENGINE_VARIABLE}={value!r} is not an engine; use one of {', '.join(ENGINES)}, or unset it.{did_you_mean(value, ENGINES)}"
        )
    return value


def check_device(device: str) -> str:
    """A device name transferkit can use: auto, cpu, cuda, cuda:N or mps (availability is checked when used)."""
    kind, _, index = str(device).partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"device must be one of {', '.join(DEVICES)}; got '{device}'.{did_you_mean(str(device), DEVICES)}")
    return device
