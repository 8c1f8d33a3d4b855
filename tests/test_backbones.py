from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from transferkit.backbones import BUILTIN_BACKBONES, load_backbone
from transferkit.backbones.freeze import param_groups, set_trainable_
from transferkit.data import make_transform
from transferkit.errors import ModelError, UsageError
from transferkit.training.loop import make_optimizer


@pytest.fixture(scope="module")
def imagenet_lite0():
    return load_backbone("builtin:efficientnet_lite0", num_classes=1000)


@pytest.mark.parametrize(("name", "expected"), [("china.jpg", 698), ("flower.jpg", 985)])
def test_builtin_weights_classify_sample_images(imagenet_lite0, name, expected):
    transform = make_transform(imagenet_lite0.data_config)
    x = transform(Image.fromarray(load_sample_image(name)))[None]
    with torch.no_grad():
        assert imagenet_lite0.model.eval()(x).argmax().item() == expected


# Lite1 and Lite2 see the pompon dahlia of flower.jpg as a honeycomb (ImageNet has no dahlia; Lite1 is unsure:
# 3.8% against 2.8% for mushroom), and china.jpg as a palace like Lite0.
@pytest.mark.parametrize(
    ("model", "size", "classes"), [("builtin:efficientnet_lite1", 240, (698, 599)), ("builtin:efficientnet_lite2", 260, (698, 599))]
)
def test_larger_builtins_classify_sample_images_at_their_own_size(model, size, classes):
    bb = load_backbone(model, num_classes=1000)
    assert bb.data_config["input_size"] == (3, size, size) and bb.data_config["mean"] == (0.5, 0.5, 0.5)
    assert bb.spec.arch == model.replace("builtin:", "tf_") and bb.spec.weights == "builtin"
    assert "by order and shape" in bb.load_report and "head loaded" in bb.load_report
    transform = make_transform(bb.data_config)
    x = torch.stack([transform(Image.fromarray(load_sample_image(n))) for n in ("china.jpg", "flower.jpg")])
    assert x.shape[-1] == size
    with torch.no_grad():
        assert tuple(bb.model.eval()(x).argmax(1).tolist()) == classes


def test_builtin_reports_how_weights_were_mapped(imagenet_lite0):
    assert "by order and shape" in imagenet_lite0.load_report
    assert "head loaded" in imagenet_lite0.load_report  # 1000 classes: the ImageNet head fits


def test_blocks_are_ordered_and_cover_every_backbone_parameter_once():
    bb = load_backbone("builtin:efficientnet_lite0", num_classes=4)
    names = [n for b in bb.blocks for n in b.param_names]
    assert len(names) == len(set(names))
    all_params = {n for n, _ in bb.model.named_parameters()}
    assert set(names) | set(bb.head_param_names) == all_params
    assert bb.blocks[0].name.startswith("conv_stem")
    assert bb.blocks[-1].name.startswith("blocks.6")
    assert bb.model.get_classifier().out_features == 4
    assert torch.count_nonzero(bb.model.get_classifier().weight) == 0  # fresh head starts at zero


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_blocks_follow_timm_group_matcher_for_other_families(arch):
    bb = load_backbone(arch, num_classes=3, weights="none")
    names = [n for b in bb.blocks for n in b.param_names]
    assert set(names) | set(bb.head_param_names) == {n for n, _ in bb.model.named_parameters()}
    assert len(names) == len(set(names))
    if arch == "resnet18":
        assert [b.name for b in bb.blocks][-2:] == ["layer3", "layer4"]


def test_unknown_model_suggests_close_names():
    with pytest.raises(UsageError, match=r"Did you mean.*resnet50"):
        load_backbone("resnet5O")


def test_local_safetensors_maps_by_name(tmp_path):
    src = load_backbone("builtin:efficientnet_lite0", num_classes=1000)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    bb = load_backbone("builtin:efficientnet_lite0", num_classes=7, weights=path)
    assert "by name" in bb.load_report and "newly initialised" in bb.load_report
    torch.testing.assert_close(bb.model.state_dict()["conv_stem.weight"], src.model.state_dict()["conv_stem.weight"])


def test_local_pth_in_foreign_names_maps_by_order():
    path = BUILTIN_BACKBONES["builtin:efficientnet_lite0"].weights_path()
    bb = load_backbone("builtin:efficientnet_lite0", num_classes=5, weights=path)
    assert "by order and shape" in bb.load_report


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in load_backbone("resnet18", 10, weights="none").model.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="do not fit"):
        load_backbone("builtin:efficientnet_lite0", num_classes=3, weights=path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": Evil()}, path)
    with pytest.raises(ModelError, match="weights_only=True"):
        load_backbone("builtin:efficientnet_lite0", num_classes=3, weights=path)
    assert not marker.exists()


def test_describe_counts_add_up():
    info = load_backbone("builtin:efficientnet_lite0", num_classes=10).describe()
    assert sum(b["params"] for b in info["blocks"]) + info["head"]["params"] == info["total_params"]
    assert info["feature_dim"] == 1280 and info["input"]["mean"] == [0.5, 0.5, 0.5]


def test_param_groups_cover_trainable_params_once_with_decaying_lr():
    bb = load_backbone("builtin:efficientnet_lite0", num_classes=3)
    set_trainable_(bb, 2)
    groups = param_groups(bb, 2, backbone_lr_scale=0.1, layer_decay=0.5, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in bb.model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
    # Each unit (head, top block, the block below) is a decay and a no-decay group sharing one name and scale.
    names = list(dict.fromkeys(g["name"] for g in groups))
    assert names == ["head", bb.blocks[-1].name, bb.blocks[-2].name]

    def per_name(group_list: list[dict], key: str) -> list[float]:
        values = [{g[key] for g in group_list if g["name"] == n} for n in names]
        assert all(len(v) == 1 for v in values), values
        return [v.pop() for v in values]

    assert per_name(groups, "lr_scale") == pytest.approx([1.0, 0.1, 0.05])
    assert np.isclose(groups[-1]["lr_scale"], 0.05)
    for g in groups:  # 1-D parameters (biases, norm scales) never decay; the rest do
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.01), g["name"]
        assert all(p.ndim <= 1 for p in g["params"]) or all(p.ndim > 1 for p in g["params"]), g["name"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}  # both kinds present (BatchNorm, convolutions)
    optimizer = make_optimizer(groups, lr=1e-3, weight_decay=0.01)
    assert per_name(optimizer.param_groups, "lr") == pytest.approx([1e-3, 1e-4, 5e-5])
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups for p in g["params"] if p.ndim <= 1)
