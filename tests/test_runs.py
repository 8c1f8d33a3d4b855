import json

import pytest

from transferkit.atomic import write_atomic
from transferkit.errors import RunError
from transferkit.runs.directory import FORMAT_VERSION, load_run, validate_meta


def good_meta():
    return {
        "format_version": FORMAT_VERSION,
        "backbone": {"arch": "tf_efficientnet_lite0"},
        "classes": ["a", "b"],
        "data_config": {"input_size": [3, 64, 64]},
        "strategy": {"spec": "feature-extraction"},
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("classes"), "lacks field 'classes'"),
        (lambda m: m.update(format_version=99), "Upgrade transferkit"),
        (lambda m: m.update(format_version="1"), "no integer format_version"),
        (lambda m: m.update(classes=[1, 2]), "list of strings"),
    ],
)
def test_invalid_manifests_are_explained(tmp_path, edit, message):
    meta = good_meta()
    edit(meta)
    with pytest.raises(RunError, match=message):
        validate_meta(meta, tmp_path / "transferkit.json")


def test_incomplete_run_directory(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunError, match="--resume"):
        load_run(tmp_path)
    write_atomic(tmp_path / "transferkit.json", json.dumps(good_meta()))
    with pytest.raises(RunError, match=r"model\.safetensors"):
        load_run(tmp_path)


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    write_atomic(tmp_path / "a.json", "{}")
    write_atomic(tmp_path / "a.json", '{"x": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_run_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_a_folder_that_is_not_a_run_is_refused_and_a_run_is_replaced_whole(tmp_path):
    from transferkit.runs.directory import check_out_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "history.csv").write_text("my own file")
    with pytest.raises(RunError, match="not a transferkit run"):
        check_out_dir(mine)
    assert (mine / "history.csv").read_text() == "my own file"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="it is a file"):
        check_out_dir(tmp_path / "file")


def test_a_run_of_the_other_modality_replaces_the_previous_run_whole(tmp_path):
    from conftest import write_folder
    from text_fixtures import topic_sentences, write_text_csv
    from transferkit import ImageClassifier, TextClassifier, load_classifier

    out = tmp_path / "run"
    ImageClassifier(strategy="feature-extraction", image_size=32).fit(write_folder(tmp_path / "c", per_class=6)).save(out)
    assert (out / "model.safetensors").is_file()
    data = write_text_csv(tmp_path / "t.csv", topic_sentences(per_class=6))
    TextClassifier(strategy="feature-extraction", max_length=16).fit(data).save(out, overwrite=True)
    assert not (out / "model.safetensors").exists() and (out / "encoder").is_dir()
    assert type(load_classifier(out)) is TextClassifier
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_an_unfinished_fit_is_not_started_over_without_resume_or_overwrite(tmp_path):
    from conftest import invoke_cli, write_folder

    root = write_folder(tmp_path / "c", per_class=6)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.json").write_text('{"phase": "finetune", "epoch": 7}')
    args = ["fit", str(root), "--strategy", "feature-extraction", "--image-size", "32", "-q", "--out", str(out)]
    refused = invoke_cli(*args, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert "epoch 7" in refused.stderr
    assert invoke_cli(*args, "--overwrite").returncode == 0 and (out / "transferkit.json").is_file()
