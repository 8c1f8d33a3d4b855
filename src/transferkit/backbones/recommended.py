"""A short, curated list of hub backbones known to transfer well, each number with its source.

Shown by ``transferkit models --recommended``. What is stored here was read from a
named source; what can be measured offline is measured when shown:

* ImageNet-1k top-1 and the input size it was measured at: timm's own evaluation,
  ``results/results-imagenet.csv`` of huggingface/pytorch-image-models (commit
  0173a139), except DINOv2, which ships no classifier: the linear probe on its frozen
  features from the DINOv2 paper (Oquab et al. 2023; the facebookresearch/dinov2 README).
* Parameters: counted from ``timm.create_model(NAME, pretrained=False)`` built on the
  meta device (no weights, no download, no memory), with the model's ImageNet head
  where it has one.
* Licence: the ``license`` field of the weights' pretrained_cfg in the installed timm.

Why these: better ImageNet models transfer better when fine-tuned (Kornblith et al.
2019, "Do Better ImageNet Models Transfer Better?"), and pretraining on more data
(ImageNet-21k / 12k, self-supervised LVD-142M) gives features that transfer further
(Steiner et al. 2021, "How to train your ViT?"; Oquab et al. 2023); the list spans the
sizes a CPU, a laptop GPU and a server GPU can fine-tune.

Example:
    >>> [r.name for r in RECOMMENDED][:2]
    ['mobilenetv3_large_100.ra_in1k', 'efficientnet_b0.ra_in1k']
"""

from __future__ import annotations

from dataclasses import dataclass

TIMM_RESULTS = "timm results-imagenet.csv (huggingface/pytorch-image-models@0173a139)"
DINOV2_PAPER = "DINOv2 linear probe on frozen features (Oquab et al. 2023; facebookresearch/dinov2 README)"
PARAMS_SOURCE = "counted: timm.create_model(NAME, pretrained=False) on the meta device"
LICENCE_SOURCE = "the weights' pretrained_cfg['license'] in the installed timm"


@dataclass(frozen=True)
class Recommended:
    """A hub backbone worth trying first, with its published ImageNet accuracy and where that number comes from."""

    name: str  # timm's name with the pretrained tag: the weights the numbers are for
    top1: float  # ImageNet-1k validation top-1, percent
    top1_px: int  # the input size that top-1 was measured at
    pretraining: str  # the data the weights learnt from, before any ImageNet-1k fine-tuning
    top1_source: str = TIMM_RESULTS


RECOMMENDED: tuple[Recommended, ...] = (
    Recommended("mobilenetv3_large_100.ra_in1k", 75.766, 224, "ImageNet-1k"),
    Recommended("efficientnet_b0.ra_in1k", 77.694, 224, "ImageNet-1k"),
    Recommended("resnet50.a1_in1k", 81.214, 288, "ImageNet-1k"),
    Recommended("vit_small_patch16_224.augreg_in21k_ft_in1k", 81.384, 224, "ImageNet-21k, fine-tuned on 1k"),
    Recommended("tf_efficientnetv2_s.in21k_ft_in1k", 84.288, 384, "ImageNet-21k, fine-tuned on 1k"),
    Recommended("convnext_tiny.in12k_ft_in1k", 84.450, 288, "ImageNet-12k, fine-tuned on 1k"),
    Recommended("eva02_small_patch14_336.mim_in22k_ft_in1k", 85.716, 336, "ImageNet-22k (masked image modelling), fine-tuned on 1k"),
    Recommended("vit_base_patch16_224.augreg2_in21k_ft_in1k", 85.096, 224, "ImageNet-21k, fine-tuned on 1k"),
    Recommended("vit_base_patch14_dinov2.lvd142m", 84.5, 224, "LVD-142M, self-supervised (no labels)", top1_source=DINOV2_PAPER),
)


def recommended_table() -> list[dict]:
    """Each recommended backbone with its parameters counted and its licence read from timm, offline.

    Returns:
        One dict per backbone: name, params, top1, top1_px, top1_source, pretraining, licence.
    """
    import timm
    import torch

    rows = []
    for r in RECOMMENDED:
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised, nothing downloaded
            model = timm.create_model(r.name, pretrained=False)
        rows.append(
            {
                "name": r.name,
                "params": sum(p.numel() for p in model.parameters()),
                "top1": r.top1,
                "top1_px": r.top1_px,
                "top1_source": r.top1_source,
                "pretraining": r.pretraining,
                "licence": model.pretrained_cfg.get("license") or "not stated",
            }
        )
    return rows
