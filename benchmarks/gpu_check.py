"""The GPU check: one script, under 5 minutes on a CUDA machine, that prints ratios and PASS/FAIL lines.

1. extraction: extract_features (AMP + channels_last) vs a plain fp32 NCHW forward, ResNet-50 224 px;
2. a fine-tune step (transferkit's finetune:all configuration and train_epoch) vs a plain fp32 loop;
3. JPEG decoding: torchvision.io.decode_jpeg(device="cuda") vs CPU decoding (PIL and torchvision.io);
4. out-of-memory recovery for real: most of the card is taken by a ballast tensor, then a batch that cannot
   fit is given to extraction (must halve and give the same features) and to a training step (must retry
   in pieces and give the same loss);
5. torchrun with NCCL and one process vs a plain process: the same fit, the same test accuracy;
6. compare's CUDA peak memory: measured (non-zero) and smaller for feature extraction than fine-tuning.

On a machine without CUDA it says so and exits 0 (nothing to check). ResNet-50 runs at random
init (no weights offline; speed does not depend on them). Run: python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import goal, header, interleaved_rates, table, write_jpegs

BATCH = 64
RESULTS: list[bool] = []


def check(text: str, measured: str, ok: bool) -> None:
    """A PASS/FAIL line (and the goal line the other benchmarks print)."""
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}: {text}  ({measured})")


def backbone(arch: str = "resnet50", size: int = 224):
    from transferkit.backbones import load_backbone

    bb = load_backbone(arch, 10, weights="none" if arch != "efficientnet_lite0" else None)
    bb.configure_input(size, None)
    return bb


def array_images(n: int, size: int = 64):
    from transferkit.data.images import ArrayImages

    rng = np.random.default_rng(0)
    return ArrayImages(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 10, [str(i) for i in range(10)], "random")


def extraction(device: torch.device) -> None:
    from transferkit.inference.extraction import extract_features, resolve_precision

    bb, images = backbone(), array_images(1024)
    dtype = resolve_precision("auto", device)
    plain = backbone().model.to(device).eval()
    loader = torch.utils.data.DataLoader(bb.dataset(images), batch_size=BATCH, num_workers=4)

    def plain_pass() -> None:
        with torch.inference_mode():
            for x, _, _ in loader:
                plain.forward_head(plain.forward_features(x.to(device)), pre_logits=True).cpu()

    rates = interleaved_rates(
        {
            "plain fp32 NCHW": plain_pass,
            "transferkit AMP + channels_last": lambda: extract_features(
                bb, images, device=device, dtype=dtype, batch_size=BATCH, workers=4, progress=False
            ),
        },
        len(images),
    )
    ratio = rates["transferkit AMP + channels_last"] / rates["plain fp32 NCHW"]
    table(["extraction, ResNet-50 224 px (end to end)", "img/s"], [[k, v] for k, v in rates.items()])
    goal(">= 2x extraction images/s on GPU vs plain fp32", f"{ratio:.2f}x", ratio >= 2)
    check("extraction AMP + channels_last faster than fp32", f"{ratio:.2f}x", ratio > 1.2)


def finetune_step(device: torch.device) -> None:
    from transferkit.backbones import freeze
    from transferkit.inference.extraction import resolve_precision
    from transferkit.training.config import FINETUNE_LR, TrainConfig
    from transferkit.training.loop import make_loss, make_optimizer, train_epoch

    xs = [torch.randn(BATCH, 3, 224, 224) for _ in range(6)]
    batches = [(x, torch.randint(0, 10, (BATCH,))) for x in xs]
    plain = backbone().model.to(device).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=FINETUNE_LR)

    def plain_epoch() -> None:
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(plain(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()

    bb, cfg = backbone(), TrainConfig()
    n = len(bb.blocks)
    groups = freeze.param_groups(bb, n, cfg.backbone_lr_scale, cfg.layer_decay, cfg.weight_decay)
    freeze.set_trainable_(bb, n)
    model = bb.model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(groups, FINETUNE_LR, cfg.weight_decay, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dtype = resolve_precision("auto", device, training=True)

    def tk_epoch() -> None:
        train_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            make_loss(cfg),
            cfg,
            device,
            dtype,
            lambda: (model.train(), freeze.set_bn_modes_(bb, "all-frozen")),
        )
        torch.cuda.synchronize()

    rates = interleaved_rates({"plain fp32 NCHW": plain_epoch, "transferkit finetune:all": tk_epoch}, BATCH * len(xs))
    ratio = rates["transferkit finetune:all"] / rates["plain fp32 NCHW"]
    table(["fine-tune step, ResNet-50 224 px, batch 64", "img/s"], [[k, v] for k, v in rates.items()])
    goal(">= 1.8x fine-tuning images/s on GPU vs plain fp32 loop", f"{ratio:.2f}x", ratio >= 1.8)
    check("fine-tune step faster than the plain fp32 loop", f"{ratio:.2f}x", ratio > 1.2)


def jpeg_decoding(device: torch.device) -> None:
    import torchvision
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), 256, size=512)
        raw = [torchvision.io.read_file(str(p)) for p in paths]

        def pil() -> None:
            for p in paths:
                Image.open(p).convert("RGB").load()

        def cpu_tv() -> None:
            torchvision.io.decode_jpeg(raw)

        def gpu_tv() -> None:
            torchvision.io.decode_jpeg(raw, device=device)
            torch.cuda.synchronize()

        rates = interleaved_rates({"PIL": pil, "torchvision.io CPU": cpu_tv, "torchvision.io CUDA": gpu_tv}, len(paths))
        same = torchvision.io.decode_jpeg(raw[0], device=device).cpu().float()
        diff = (same - torchvision.io.decode_jpeg(raw[0]).float()).abs().mean().item()
    table(["JPEG decode, 256 images 512 px", "img/s"], [[k, v] for k, v in rates.items()])
    ratio = rates["torchvision.io CUDA"] / rates["torchvision.io CPU"]
    check("GPU JPEG decoding faster than CPU decoding", f"{ratio:.2f}x", ratio > 1)
    check("GPU and CPU decode the same pixels (mean |diff| < 2 levels)", f"{diff:.2f}", diff < 2)


def out_of_memory(device: torch.device) -> None:
    """A ballast leaves ~3 GB free, so a ResNet-50 batch of 256 at 448 px cannot fit: both paths must recover."""
    from transferkit.inference.extraction import extract_features

    bb, images = backbone(size=448), array_images(256)
    reference = extract_features(
        bb, images.subset(range(32)), device=device, dtype=torch.bfloat16, batch_size=8, workers=0, progress=False
    ).astype(np.float32)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("transferkit").addHandler(handler)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(free - 3 * 2**30, 0), dtype=torch.uint8, device=device)
    try:
        feats = extract_features(bb, images, device=device, dtype=torch.bfloat16, batch_size=256, workers=4, progress=False).astype(
            np.float32
        )
        halved = any("halving" in m for m in records)
        cos = float(((feats[:32] * reference).sum(1) / np.linalg.norm(feats[:32], axis=1) / np.linalg.norm(reference, axis=1)).mean())
        check(
            "extraction recovers from a real out-of-memory (halves the batch, same features)",
            f"halved: {halved}, cosine {cos:.5f}",
            halved and cos > 0.999,
        )
        records.clear()
        check("fine-tuning recovers from a real out-of-memory (pieces, same step)", *train_under_pressure(device, records))
    finally:
        del ballast
        logging.getLogger("transferkit").removeHandler(handler)
        torch.cuda.empty_cache()


def train_under_pressure(device: torch.device, records: list[str]) -> tuple[str, bool]:
    from transferkit.backbones import freeze
    from transferkit.training.config import TrainConfig
    from transferkit.training.loop import make_loss, make_optimizer, train_epoch

    bb, cfg = backbone(size=448), TrainConfig(grad_clip=None)
    n = len(bb.blocks)
    freeze.set_trainable_(bb, n)
    model = bb.model.to(device)
    optimizer = make_optimizer(freeze.param_groups(bb, n, 0.3, 0.8, 0.0), 1e-3, 0.0, "sgd")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = [(torch.randn(128, 3, 448, 448), torch.randint(0, 10, (128,)))]
    try:
        loss, _ = train_epoch(model, batch, optimizer, scheduler, make_loss(cfg), cfg, device, torch.bfloat16)
    except Exception as e:  # the check reports any failure
        return f"{type(e).__name__}: {e}"[:200], False
    pieces = any("pieces" in m for m in records)
    return f"retried in pieces: {pieces}, loss {loss:.3f}", pieces and np.isfinite(loss)


def torchrun_nccl(device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fit = ["-m", "transferkit", "fit", "digits", "--strategy", "finetune:last=1", "--epochs", "1", "--device", "cuda", "-q", "--out"]
        started = time.perf_counter()
        plain = subprocess.run([sys.executable, *fit, f"{tmp}/plain"], capture_output=True, text=True, timeout=120)
        mid = time.perf_counter()
        ddp = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *fit, f"{tmp}/ddp"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        done = time.perf_counter()
        if plain.returncode or ddp.returncode:
            check("torchrun (NCCL, 1 process) fit runs", (plain.stderr + ddp.stderr)[-300:], False)
            return
        accs = [json.loads(Path(f"{tmp}/{k}/transferkit.json").read_text())["metrics"]["test"]["accuracy"] for k in ("plain", "ddp")]
    print(f"fit digits finetune:last=1, 1 epoch: plain {mid - started:.0f} s, torchrun {done - mid:.0f} s")
    check(
        "torchrun NCCL 1 process: same test accuracy as one plain process (within 0.5 pt)",
        f"{100 * accs[0]:.2f}% vs {100 * accs[1]:.2f}%",
        abs(accs[0] - accs[1]) <= 0.005,
    )


def compare_memory(device: torch.device) -> None:
    from transferkit.compare.run import compare
    from transferkit.data import load_data

    result = compare(
        load_data("digits", seed=0),
        data_name="digits",
        strategies=["feature-extraction", "finetune:all"],
        settings={"epochs": 1, "device": "cuda"},
        cv=0,
    )
    peaks = {r.strategy: r.peak_memory_mib for r in result.results}
    table(["compare on digits (CUDA)", "peak MiB"], [[k, v] for k, v in peaks.items()])
    check(
        "compare reports CUDA peak memory, feature extraction below finetune:all",
        ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()),
        all(v > 0 for v in peaks.values()) and peaks["feature-extraction"] < peaks["finetune:all"],
    )


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. Run it on a machine with an NVIDIA GPU."
        )
        return 0
    device = torch.device("cuda")
    header(f"GPU check on {torch.cuda.get_device_name(device)}")
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    for step in (extraction, finetune_step, jpeg_decoding, out_of_memory, torchrun_nccl, compare_memory):
        try:
            step(device)
        except Exception as e:  # one failing check must not hide the others
            check(f"{step.__name__} ran", f"{type(e).__name__}: {e}"[:300], False)
        print(f"[{step.__name__} done at {time.perf_counter() - started:.0f} s]\n")
    print(f"gpu_check: {sum(RESULTS)} of {len(RESULTS)} checks passed in {time.perf_counter() - started:.0f} s")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
