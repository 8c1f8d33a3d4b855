"""Contract tests run over every registered strategy, plus parsing, BatchNorm drift and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import TINY, copy_run, finetune_phase_alone, invoke_cli, write_folder
from transferkit import ImageClassifier
from transferkit.backbones import load_backbone
from transferkit.backbones.freeze import param_groups, set_bn_modes_, set_trainable_
from transferkit.data import load_data
from transferkit.errors import UsageError
from transferkit.training.strategies import Strategy, parse_strategy, plan_phases

STRATEGIES = ["feature-extraction", "finetune:last=2", "finetune:all", "lp-ft", "gradual"]


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    return load_data(write_folder(tmp_path_factory.mktemp("tiny") / "colours", per_class=10), seed=0)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("feature-extraction", Strategy("feature-extraction")),
        ("linear-probe", Strategy("feature-extraction")),
        ("transfer", Strategy("feature-extraction")),
        ("finetune", Strategy("finetune", None)),
        ("finetune:all", Strategy("finetune", None)),
        ("finetune:last=3", Strategy("finetune", 3)),
        ("LP-FT", Strategy("lp-ft")),
        ("gradual", Strategy("gradual")),
        ("auto", Strategy("auto")),
    ],
)
def test_parse_strategy(spec, expected):
    assert parse_strategy(spec) == expected
    assert parse_strategy(expected.spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("finetune:last=0", "N >= 1"),
        ("finetune:first=2", "finetune:last=N"),
        ("fientune", "Did you mean: finetune"),
        ("lp-ft:3", "takes no argument"),
        ("", "non-empty"),
    ],
)
def test_bad_strategy_specs_explain_the_valid_forms(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_strategy(spec)


def test_last_n_larger_than_the_backbone_is_rejected():
    with pytest.raises(UsageError, match="more blocks than the backbone has"):
        plan_phases(parse_strategy("finetune:last=9"), None, None, n_blocks=8)


@pytest.mark.parametrize("spec", STRATEGIES)
def test_strategy_freezes_what_it_declares_and_groups_cover_trainables_once(spec):
    bb = load_backbone("builtin:efficientnet_lite0", num_classes=3)
    n = len(bb.blocks)
    for phase in plan_phases(parse_strategy(spec), 3, None, n):
        for epoch in range(phase.epochs):
            k = 0 if phase.on_features else phase.trainable_count(n, epoch)
            set_trainable_(bb, k)
            trainable = {name for name, p in bb.model.named_parameters() if p.requires_grad}
            declared = set(bb.head_param_names) | {p for b in bb.blocks[n - k :] for p in b.param_names} if k else set(bb.head_param_names)
            assert trainable == declared, (spec, phase.name, epoch)
            groups = param_groups(bb, k, 0.1, 0.8, 0.01)
            ids = [id(p) for g in groups for p in g["params"]]
            assert len(ids) == len(set(ids))
            assert set(ids) == {id(p) for p in bb.model.parameters() if p.requires_grad}
    if spec == "gradual":
        phase = plan_phases(parse_strategy(spec), 3, None, n)[-1]
        assert [phase.trainable_count(n, e) for e in range(3)] == [1, 2, 3]


@pytest.mark.parametrize("spec", STRATEGIES)
def test_strategy_trains_and_round_trips(spec, tiny_splits, tmp_path):
    clf = ImageClassifier(strategy=spec, **TINY).fit(tiny_splits)
    image_rows = [r for r in clf.history_ if r["phase"] != "head"]
    if spec != "feature-extraction":
        assert len(image_rows) == 2
        # The new head starts at zero, i.e. at loss ln(3); every phase must end well below it.
        assert image_rows[-1]["train_loss"] < 0.5 * math.log(3), image_rows
    probe_losses = [r["train_loss"] for r in clf.history_ if r["phase"] == "head"]
    assert min(probe_losses) < 0.5 * math.log(3)
    head = [r for r in clf.history_ if r["phase"] == "head"]
    assert max(r["val_acc"] for r in head) >= 0.8  # the probe learns the colours
    before = clf.predict_proba(tiny_splits.test)
    clf.save(tmp_path / "run")
    again = ImageClassifier.load(tmp_path / "run", precision="fp32")
    np.testing.assert_allclose(again.predict_proba(tiny_splits.test), before, atol=1e-5)
    meta = json.loads((tmp_path / "run" / "transferkit.json").read_text())
    assert meta["strategy"]["spec"] == parse_strategy(spec).spec
    if spec.startswith("finetune:last"):
        ft = meta["strategy"]["phases"][-1]
        assert ft["trainable_blocks"] == [b.name for b in clf.backbone_.blocks[-2:]]
        lrs = list(ft["lrs"].values())
        assert lrs[0] > lrs[1] > lrs[2]  # head fastest, decaying going down


def bn_stats(model):
    return {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("policy", ["frozen-blocks", "all-frozen"])
def test_frozen_blocks_batchnorm_statistics_do_not_drift(policy, tiny_splits):
    clf = ImageClassifier(strategy="finetune:last=1", bn=policy, **TINY)
    initial = bn_stats(load_backbone("builtin:efficientnet_lite0", 3).model)
    clf.fit(tiny_splits)
    top_modules = {n.rsplit(".", 1)[0] for n in clf.backbone_.blocks[-1].param_names}
    for name, mean in bn_stats(clf.model_).items():
        if name not in top_modules or policy == "all-frozen":
            assert torch.equal(mean, initial[name]), f"{name} drifted"
    bb, _ = finetune_phase_alone(tiny_splits, "finetune:last=1", bn=policy)
    after = bn_stats(bb.model)
    top = bb.blocks[-1].param_names
    top_modules = {n.rsplit(".", 1)[0] for n in top}
    for name, mean in after.items():
        if name in top_modules and policy == "frozen-blocks":
            assert not torch.equal(mean, initial[name]), f"{name} should adapt"
        else:
            assert torch.equal(mean, initial[name]), f"{name} drifted"


def test_bn_modes_match_requires_grad():
    bb = load_backbone("builtin:efficientnet_lite0", 3)
    set_trainable_(bb, 1)
    bb.model.train()
    n = set_bn_modes_(bb, "frozen-blocks")
    training = [m for m in bb.model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
    assert n > 0 and training and all(m.weight.requires_grad for m in training)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigint_saves_and_resume_equals_an_uninterrupted_run(finetune_run, tmp_path):
    """Ctrl-C (SIGINT) in the real console script after a fine-tuning epoch, then --resume: the session's run exactly."""
    cut = tmp_path / "cut"
    argv = [sys.executable, "-m", "transferkit", *finetune_run.args, "--out", str(cut)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    progress = cut / "checkpoints" / "last.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if progress.exists() and json.loads(progress.read_text()).get("epoch", 0) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and not (cut / "transferkit.json").exists()
    state = json.loads(progress.read_text())
    assert state["phase"] == "finetune"
    assert state["trainable_blocks"] == [load_backbone("builtin:efficientnet_lite0", 3).blocks[-1].name]
    invoke_cli(*finetune_run.args, "--out", str(cut), "--resume")
    a = json.loads((finetune_run.out / "transferkit.json").read_text())
    b = json.loads((cut / "transferkit.json").read_text())
    assert a["metrics"]["test"]["accuracy"] == b["metrics"]["test"]["accuracy"]
    assert a["metrics"]["test"]["confusion"] == b["metrics"]["test"]["confusion"]
    # Same per-epoch losses and accuracies (columns phase .. val_acc; wall time differs).
    hist_a = (finetune_run.out / "history.csv").read_text().splitlines()
    hist_b = (cut / "history.csv").read_text().splitlines()
    assert [line.split(",")[:5] for line in hist_a] == [line.split(",")[:5] for line in hist_b]
    assert len(hist_a) == 1 + 13 + 3  # header, 13 probe C values, 3 fine-tuning epochs


def test_resume_with_other_options_is_refused(finetune_run, tmp_path):
    """The CLI's refusal, on a copy of the session's finished run; the message itself is tested in test_checkpoints."""
    out = copy_run(finetune_run.out, tmp_path / "r")
    other = [a if a != "finetune:last=1" else "finetune:last=2" for a in finetune_run.args]
    proc = invoke_cli(*other, "--out", str(out), "--resume", check=False)
    assert proc.returncode == 2 and "different run" in proc.stderr and "strategy" in proc.stderr
    assert "'finetune:last=1' in the checkpoint, 'finetune:last=2' now" in " ".join(proc.stderr.split())


def test_resume_with_more_epochs_extends_a_finished_run(finetune_run, tmp_path):
    """`--resume --epochs 4` on a finished 3-epoch fit trains one more epoch from where it stopped; fewer is refused."""
    out = copy_run(finetune_run.out, tmp_path / "r")
    args = [*finetune_run.args, "--out", str(out)]
    before = (out / "history.csv").read_text().splitlines()
    longer = [*args, "--resume"]
    longer[longer.index("--epochs") + 1] = "4"
    proc = invoke_cli(*longer)
    assert proc.returncode == 0, proc.stderr
    assert "Extending the fit from 3 to 4 epochs" in " ".join(proc.stderr.split())
    after = (out / "history.csv").read_text().splitlines()
    assert [line.split(",")[:5] for line in after[:-1]] == [line.split(",")[:5] for line in before]
    assert len(after) == len(before) + 1 and after[-1].startswith("finetune,4,")
    meta = json.loads((out / "transferkit.json").read_text())
    assert meta["strategy"]["phases"][-1]["epochs_run"] == 4
    shorter = invoke_cli(*args, "--resume", check=False)
    assert shorter.returncode == 2 and "epochs: 4 in the checkpoint, 3 now" in " ".join(shorter.stderr.split())


def test_augmentation_levels_and_a_fit_with_light_augmentation(tiny_splits):
    from transferkit.data import make_transform

    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    light, strong = repr(make_transform(cfg, "light")), repr(make_transform(cfg, "strong"))
    assert "RandomResizedCrop" in light and "RandomHorizontalFlip" not in light  # digits and text must not flip
    assert "RandomHorizontalFlip" in strong and "RandomErasing" in strong
    assert "RandomResizedCrop" not in repr(make_transform(cfg))  # evaluation never augments
    with pytest.raises(UsageError, match="Did you mean: light"):
        make_transform(cfg, "lihgt")
    clf = ImageClassifier(strategy="finetune:last=1", augment="light", **TINY).fit(tiny_splits)
    assert all(np.isfinite(r["train_loss"]) for r in clf.history_)
    assert clf.metrics_["test"]["accuracy"] >= 0.6
