"""Bad input from a new user's first hour: each command fails with one clear message, never a traceback,
names what was wrong, and changes no file it was not asked to write."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import invoke_cli, run_cli, write_folder
from text_fixtures import topic_sentences, write_text_csv


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def protected(tmp_path_factory) -> Path:
    """A folder of the user's own files: data, a text CSV, a folder of their notes, a stray file."""
    root = tmp_path_factory.mktemp("protected")
    write_folder(root / "images", per_class=6)
    write_text_csv(root / "texts.csv", topic_sentences(per_class=6))
    (root / "notes").mkdir()
    (root / "notes" / "history.csv").write_text("my own history\n")
    (root / "a_file").write_text("not a folder\n")
    (root / "model.pt").write_bytes(b"not a run")
    return root


CORPUS = [  # (arguments with {p} for the protected folder, words the message must hold)
    (["fit", "{p}/missing.csv"], ["missing.csv", "does not exist"]),
    (["fit", "{p}/images", "--weights", "{p}/nothere.pth"], ["nothere.pth", "does not exist", "--weights"]),
    (["inspect", "builtin:efficientnet_lite0", "--weights", "{p}/nothere.safetensors"], ["nothere.safetensors", "does not exist"]),
    (["fit", "{p}/images", "--model", "minilm"], ["minilm", "text model", "images"]),
    (["fit", "{p}/texts.csv", "--model", "builtin:efficientnet_lite0"], ["builtin:efficientnet_lite0", "image model", "texts"]),
    (["fit", "{p}/texts.csv", "--model", "minilmm"], ["minilmm", "Did you mean: minilm"]),
    (["fit", "{p}/images", "--optimizer", "adam"], ["optimizer", "adam", "adamw"]),
    (["fit", "{p}/images", "--strategy", "finetune:lst=1"], ["finetune:lst=1", "finetune:last=N"]),
    (["fit", "{p}/images", "--split", "0.5,0.5"], ["split", "sum to 1"]),
    (["fit", "{p}/texts.csv", "--image-size", "64"], ["image_size", "images"]),
    (["fit", "{p}/images", "--out", "{p}/a_file"], ["a_file", "is a file", "--out"]),
    (["fit", "{p}/images", "--out", "{p}/notes"], ["notes", "not a transferkit run", "--out"]),
    (["compare", "{p}/images", "--out", "{p}/a_file"], ["a_file", "is a file"]),
    (["compare", "{p}/images", "--seeds", "0"], ["--seeds", "greater than or equal to 1"]),
    (
        ["compare", "{p}/images", "--cv", "1", "--strategies", "feature-extraction", "--out", "{p}/../cv1"],
        ["--cv", "1", "at least 2 folds"],
    ),
    (["predict", "{p}/model.pt", "{p}/images/red/000.jpg"], ["model.pt", "run directory", "ONNX"]),
    (["predict", "{p}/notes", "{p}/images/red/000.jpg"], ["notes", "not a finished transferkit run"]),
    (["evaluate", "{p}/notes", "{p}/images"], ["notes", "not a finished transferkit run"]),
]


@pytest.mark.parametrize(("args", "words"), CORPUS, ids=[" ".join(a).replace("{p}/", "") for a, _ in CORPUS])
def test_bad_commands_fail_clearly_and_touch_nothing(protected, tmp_path, args, words):
    before = snapshot(protected)
    quiet = ["-q"] if args[0] in ("fit", "compare") else []
    proc = invoke_cli(*[a.format(p=protected) for a in args], *quiet, cwd=tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), output
    assert "Traceback" not in output
    for w in words:
        assert w in output, f"{w!r} not in: {output}"
    assert snapshot(protected) == before  # nothing of the user's changed
    assert not (tmp_path / "runs").exists()  # and no default run directory was started


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


@pytest.mark.subprocess  # huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once, when imported
@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize(("model", "data"), [("resnet18", "images"), ("bert-base-uncased", "texts.csv")])
def test_a_hub_model_without_network_fails_at_once_and_says_what_to_do(protected, tmp_path, how, model, data):
    """No hub, no cached copy: one clear line naming the cause and the offline choices, without the retries.

    huggingface_hub retries a failed connection with backoff (about 50 s); "Retrying" in the output would mean
    the download was attempted instead of the hub's reachability being checked first.
    """
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    proc = run_cli("fit", f"{protected}/{data}", "--model", model, "-q", "--out", str(tmp_path / "r"), cwd=tmp_path, check=False, env=env)
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode in (1, 2) and "Traceback" not in output and "Retrying" not in output, output
    assert model in output and ("cannot be reached" if how == "unreachable" else "HF_HUB_OFFLINE is set") in output
    assert "hub cache" in output and "built-in" in output
