"""Can decoding keep up with the model? Decode+transform throughput vs extraction throughput, per engine.

300 generated 256x256 JPEGs in a temporary folder, read through transferkit's
own path (FileImages -> open_image -> the backbone's timm eval transform ->
DataLoader) with 0, 1 and 2 worker processes, vs the model alone (the frozen
runner of each engine, torch and OpenVINO when installed, on ready tensors), vs
the two together (extract_features with that engine, 0 and 2 workers).
Built-in EfficientNet-Lite0 at its own 224 px, and at 64 px (the digits demo's size).
Once OpenVINO makes the model several times faster, decoding must keep up: the
goal is decode+transform >= 2x the fastest engine's model throughput.

Run: python benchmarks/data_pipeline.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from _common import goal, header, rate, table, write_jpegs

from transferkit.backbones import load_backbone
from transferkit.data import FileImages
from transferkit.inference.extraction import extract_features, input_shape, pooled_cut, resolve_precision
from transferkit.inference.runners import frozen_runner, openvino_installed

N_IMAGES = 300
BATCH = 128  # extract_features' default
WORKERS = (0, 1, 2)


def pipeline_rate(bb, images: FileImages, workers: int) -> float:
    """Decode + the backbone's own preprocessing, no model."""
    loader = torch.utils.data.DataLoader(bb.dataset(images), batch_size=BATCH, num_workers=workers, collate_fn=bb.collate)

    def run() -> None:
        for _ in loader:
            pass

    return rate(run, len(images), repeat=2, warmup=1)


def model_rate(bb, dtype: torch.dtype | None, engine: str) -> float:
    """The engine's frozen runner alone (pooled features) on ready tensors."""
    bb.model.eval().to(memory_format=torch.channels_last)
    run, _ = frozen_runner(pooled_cut(bb), input_shape(bb), device=torch.device("cpu"), precision=dtype, engine=engine)
    x = torch.randn(BATCH, *input_shape(bb))

    def once() -> None:
        with torch.inference_mode():
            run(x)

    return rate(once, BATCH, repeat=3, warmup=1)


def main() -> None:
    header(f"data pipeline: decode+transform of {N_IMAGES} JPEGs (256x256) vs model extraction, EfficientNet-Lite0")
    cpu = torch.device("cpu")
    dtype = resolve_precision("auto", cpu)
    bb = load_backbone("builtin:efficientnet_lite0", 4)
    with tempfile.TemporaryDirectory(prefix="tk-bench-e-") as tmp:
        paths = write_jpegs(Path(tmp), N_IMAGES)
        images = FileImages(paths, [int(p.parent.name[-1]) for p in paths], [f"class{i}" for i in range(4)])
        rows, ratios = [], {}
        engines = ("torch", "openvino") if openvino_installed() else ("torch",)
        for size in (224, 64):  # 224 px is the backbone's own input size
            bb.configure_input(size)
            pipe = {w: pipeline_rate(bb, images, w) for w in WORKERS}
            best = max(pipe.values())
            for engine in engines:
                model = model_rate(bb, dtype, engine)
                both = {
                    w: rate(
                        lambda w=w, engine=engine: extract_features(
                            bb, images, device=cpu, dtype=dtype, workers=w, progress=False, engine=engine
                        ),
                        N_IMAGES,
                        repeat=1,
                        warmup=1,
                    )
                    for w in (0, 2)
                }
                ratios[size] = best / model  # the last engine is the fastest one
                rows.append([f"{size} px", engine, pipe[0], pipe[1], pipe[2], model, best / model, both[0], both[2]])
    table(
        [
            "input",
            "engine",
            "decode 0 workers",
            "1 worker",
            "2 workers",
            "model img/s",
            "best decode / model",
            "extract_features 0 w",
            "2 w",
        ],
        rows,
    )
    print(
        "(img/s; decode = DataLoader over files, no model; model = the engine's runner on ready tensors; extract_features = both together)"
    )
    for size, r in ratios.items():
        advice = "" if r >= 2 else " (decoding bounds throughput: small datasets should be decoded once)"
        goal(f"decode+transform >= 2x the fastest engine's model throughput at {size} px", f"{r:.2f}x{advice}", r >= 2)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
