"""training/checkpoints: what a checkpoint holds, and which resumes it refuses (with what message) before any training."""

from __future__ import annotations

import json

import pytest
import torch

from transferkit.errors import RunError, UsageError
from transferkit.training.checkpoints import Checkpoints, ResumeState, fingerprint_diff
from transferkit.training.strategies import DEFAULT_FINETUNE_EPOCHS


def fingerprint(**changes) -> dict:
    """What fit records for a run (model, strategy, data hash, settings); `changes` edits it, settings by their name."""
    settings = {"epochs": 1, "lr": None, "batch_size": 8, "seed": 0, "precision": "fp32"}
    settings.update({k: changes.pop(k) for k in list(changes) if k in settings})
    return {
        "model": "builtin:efficientnet_lite0",
        "weights": None,
        "strategy": "finetune:last=1",
        "bn": "frozen-blocks",
        "preprocessing": {"input_size": [3, 32, 32]},
        "data": "0123456789abcdef",
        "settings": settings,
        **changes,
    }


STATE = ResumeState(
    phase_index=1,
    phase="finetune",
    epoch=1,
    trainable_blocks=["blocks.6"],
    bn="frozen-blocks",
    loop=None,
    model={"w": torch.ones(2)},
    results=[],
    notes={},
)


@pytest.fixture
def written(tmp_path) -> Checkpoints:
    """A checkpoint of a 1-epoch `finetune:last=1` fit, as the trainer writes it after an epoch."""
    checkpoints = Checkpoints(tmp_path / "checkpoints", fingerprint())
    checkpoints.write(STATE)
    return checkpoints


def test_a_checkpoint_reads_back_what_was_written_and_says_where_it_stands(written):
    state = written.read()
    assert torch.equal(state.model["w"], STATE.model["w"]) and state.epoch == 1 and state.extend is None
    assert state.with_(model=None) == STATE.with_(model=None)  # every field read back as written
    assert json.loads((written.folder / "last.json").read_text()) == {
        "phase_index": 1,
        "phase": "finetune",
        "epoch": 1,
        "trainable_blocks": ["blocks.6"],
        "phase_epochs": None,
    }
    assert written.exists() and [p.name for p in written.folder.iterdir() if p.name.startswith(".")] == []  # written atomically


def test_resume_with_another_strategy_is_refused_naming_both_values(written):
    with pytest.raises(UsageError) as refused:
        Checkpoints(written.folder, fingerprint(strategy="finetune:last=2")).read()
    message = " ".join(str(refused.value).split())
    assert refused.value.exit_code == 2 and "different run" in message and "strategy" in message
    assert "'finetune:last=1' in the checkpoint, 'finetune:last=2' now" in message
    assert "only a larger --epochs" in message and "another --out" in message  # the two ways on


def test_resume_with_fewer_epochs_is_refused_and_changed_data_is_named_without_its_hash(written):
    extended = Checkpoints(written.folder, fingerprint(epochs=2))
    extended.write(STATE.with_(epoch=2))  # extended to 2 epochs; asking for 1 again is fewer
    with pytest.raises(UsageError, match="different run") as refused:
        Checkpoints(written.folder, fingerprint(epochs=1)).read()
    assert "epochs: 2 in the checkpoint, 1 now" in " ".join(str(refused.value).split())
    with pytest.raises(UsageError, match=r"the data \(its files or their contents\) changed") as refused:
        Checkpoints(written.folder, fingerprint(epochs=2, data="fedcba9876543210")).read()
    assert "0123456789abcdef" not in str(refused.value)


def test_a_larger_epoch_count_extends_and_nothing_else_may_change_with_it(written):
    assert Checkpoints(written.folder, fingerprint(epochs=2)).read().extend == (1, 2)
    with pytest.raises(UsageError, match="batch_size: 8 in the checkpoint, 16 now"):
        Checkpoints(written.folder, fingerprint(epochs=2, batch_size=16)).read()


def test_epochs_left_out_is_the_strategy_default(tmp_path):
    default = Checkpoints(tmp_path, fingerprint(epochs=None))
    default.write(STATE)
    more = DEFAULT_FINETUNE_EPOCHS + 3
    assert Checkpoints(tmp_path, fingerprint(epochs=more)).read().extend == (DEFAULT_FINETUNE_EPOCHS, more)
    with pytest.raises(UsageError, match="different run"):
        Checkpoints(tmp_path, fingerprint(epochs=DEFAULT_FINETUNE_EPOCHS - 1)).read()


def test_no_checkpoint_and_an_unreadable_one_say_what_to_do(tmp_path, written):
    with pytest.raises(UsageError, match=r"--resume found no checkpoint at .*Run fit without --resume"):
        Checkpoints(tmp_path / "nothing", fingerprint()).read()
    written.path.write_bytes(written.path.read_bytes()[:100])  # cut short, as by a full disk
    with pytest.raises(RunError, match=r"cannot be read .*delete it and fit without --resume"):
        written.read()


def test_fingerprint_diff_names_nested_settings_with_both_values():
    assert fingerprint_diff(fingerprint(), fingerprint(lr=0.1, bn="all-frozen")) == [
        "bn: 'frozen-blocks' in the checkpoint, 'all-frozen' now",
        "settings.lr: None in the checkpoint, 0.1 now",
    ]
    assert fingerprint_diff(fingerprint(), fingerprint()) == []
