"""A loaded estimator has the parameters it was trained with, so clone(loaded).fit trains the same configuration
(issue 28: 3)."""

from __future__ import annotations

import json

from sklearn.base import clone

from conftest import write_folder
from transferkit import ImageClassifier, load_classifier

TRAINED = dict(strategy="finetune:all", image_size=32, epochs=1, lr=0.002, batch_size=8, precision="fp32", seed=3)


def test_a_loaded_estimator_has_the_parameters_it_was_trained_with_and_clones_to_the_same_fit(tmp_path):
    images = write_folder(tmp_path / "colours", per_class=6)
    original = ImageClassifier("builtin:efficientnet_lite0", **TRAINED).fit(images)
    loaded = load_classifier(original.save(tmp_path / "run"))
    assert loaded.get_params() == original.get_params()
    again = clone(loaded).fit(images)
    assert again.config_ == original.config_ and again.strategy_.spec == "finetune:all"
    assert [p.name for p in again.phases_] == [p.name for p in original.phases_]
    assert again.data_config_["input_size"] == original.data_config_["input_size"] == (3, 32, 32)


def test_a_run_saved_before_the_settings_were_recorded_loads_with_its_strategy_and_training_config(tmp_path):
    images = write_folder(tmp_path / "colours", per_class=6)
    run = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction", image_size=32, epochs=4).fit(images)
    run = run.save(tmp_path / "run")
    meta = json.loads((run / "transferkit.json").read_text())
    del meta["settings"]  # as an older transferkit wrote it (image runs recorded none)
    (run / "transferkit.json").write_text(json.dumps(meta))
    params = load_classifier(run).get_params()
    assert params["strategy"] == "feature-extraction" and params["epochs"] == 4 and params["model"] == "builtin:efficientnet_lite0"
