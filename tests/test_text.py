"""Text models end to end with the real built-in MiniLM, real transformers and peft; LoRA also on a timm ViT."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import invoke_cli, write_folder
from text_fixtures import topic_sentences, write_text_csv
from transferkit import ImageClassifier, TextClassifier
from transferkit.backbones import load_backbone, load_text_backbone
from transferkit.backbones.lora import add_adapters_
from transferkit.data import load_data, load_text_data
from transferkit.errors import DataError, UsageError

FAST = dict(max_length=32, epochs=1, batch_size=16, progress=False, precision="fp32")
CHANCE = 0.25  # four balanced topics


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    """240 templated sentences (60 per topic) as a CSV."""
    return write_text_csv(tmp_path_factory.mktemp("text") / "topics.csv", topic_sentences(60))


@pytest.fixture(scope="module")
def finetuned_run(topics, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "t"
    proc = invoke_cli(
        "fit",
        str(topics),
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--model",
        "minilm",
        "--strategy",
        "finetune:last=1",
        "--max-length",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--precision",
        "fp32",
        "--out",
        str(out),
        "-q",
    )
    return out, proc


def test_cli_fit_finetune_last_1_learns_the_topics(finetuned_run):
    out, proc = finetuned_run
    meta = json.loads((out / "transferkit.json").read_text())
    acc = meta["metrics"]["test"]["accuracy"]
    print(f"finetune:last=1 test accuracy {acc:.4f}")
    assert acc > 0.7 > CHANCE
    assert meta["modality"] == "text" and meta["data_config"]["pooling"] == "mean"  # MiniLM's own pooling config
    assert meta["strategy"]["phases"][-1]["trainable_blocks"] == ["encoder.encoder.layer.5"]  # the top layer only
    assert "168 train / 36 val / 36 test texts" in proc.stdout


def test_text_run_loads_with_plain_transformers(finetuned_run):
    """AutoModel.from_pretrained(run/encoder) + mean pooling + head.safetensors gives transferkit's logits."""
    from transformers import AutoModel, AutoTokenizer

    out, _ = finetuned_run
    texts = ["The chef simmered a curry.", "Snow is expected tonight.", "The keeper saved a penalty."]
    encoder, tokenizer = AutoModel.from_pretrained(out / "encoder").eval(), AutoTokenizer.from_pretrained(out / "encoder")
    head = load_file(out / "head.safetensors")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    plain = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
    ours = TextClassifier.load(out, precision="fp32").decision_function(texts)
    np.testing.assert_allclose(plain.numpy(), ours, atol=1e-4)


def test_cli_predict_strings_and_a_file_of_lines(finetuned_run, tmp_path):
    out, _ = finetuned_run
    lines = tmp_path / "lines.txt"
    lines.write_text("The baker whisked eggs for a cake.\n\nThe laptop crashed after the update.\n")
    proc = invoke_cli("predict", str(out), "The striker scored in the final.", "--file", str(lines), "--json")
    rows = json.loads(proc.stdout)
    assert next(r["text"] for r in rows) == "The striker scored in the final." and len(rows) == 3
    assert [r["predictions"][0]["label"] for r in rows] == ["sports", "cooking", "technology"]


@pytest.mark.slow
def test_lora_trains_only_adapters_and_head_and_round_trips(topics, tmp_path):
    clf = TextClassifier("minilm", strategy="lora", **FAST).fit(topics)
    trainable = [n for n, p in clf.model_.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.endswith(("head.weight", "head.bias")) for n in trainable)
    assert sum(".lora_" in n for n in trainable) == 6 * 6 * 2  # 6 layers x (q, k, v, attn out, MLP in, MLP out) x (A, B)
    acc = clf.metrics_["test"]["accuracy"]
    print(f"lora test accuracy {acc:.4f}")
    assert acc > 0.7
    clf.save(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    texts = ["Rain and wind all weekend.", "The app encrypts messages.", "Roast the peppers slowly."]
    loaded = TextClassifier.load(tmp_path / "lora", precision="fp32")
    assert loaded.predict(texts) == clf.predict(texts)
    np.testing.assert_allclose(loaded.decision_function(texts), clf.decision_function(texts), atol=1e-4)


def test_lora_on_a_small_vit(tmp_path):
    splits = load_data(write_folder(tmp_path / "colours", per_class=8), seed=0)
    clf = ImageClassifier("test_vit", weights="none", strategy="lora", epochs=1, batch_size=8, progress=False, precision="fp32").fit(splits)
    trainable = {n for n, p in clf.model_.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert adapted == {"qkv", "proj", "fc1", "fc2"}
    assert trainable - {n for n in trainable if ".lora_" in n} == {"base_model.model.head.weight", "base_model.model.head.bias"}
    clf.save(tmp_path / "run")
    loaded = ImageClassifier.load(tmp_path / "run", precision="fp32")  # merged weights in plain timm names
    paths = splits.test.paths
    assert loaded.predict(paths) == clf.predict(paths)
    np.testing.assert_allclose(loaded.decision_function(paths), clf.decision_function(paths), atol=1e-4)


def test_lora_run_resumes_from_its_checkpoint(tmp_path):
    """A checkpoint taken after the lora phase holds adapter weights: resume adds the adapters before loading them."""
    splits = load_data(write_folder(tmp_path / "colours", per_class=8), seed=0)
    settings = dict(
        weights="none", strategy="lora", epochs=1, batch_size=8, progress=False, precision="fp32", checkpoint_dir=tmp_path / "checkpoints"
    )
    first = ImageClassifier("test_vit", **settings).fit(splits)
    again = ImageClassifier("test_vit", resume=True, **settings).fit(splits)
    np.testing.assert_array_equal(again.decision_function(splits.test), first.decision_function(splits.test))


def test_lora_refuses_a_network_without_linear_layers_in_its_blocks():
    with pytest.raises(UsageError, match="finetune:last=N"):
        add_adapters_(load_backbone("test_resnet", 3, weights="none"))


def test_blocks_are_embeddings_then_the_transformer_layers():
    bb = load_text_backbone("minilm", 4)
    assert [b.name for b in bb.blocks] == ["embeddings"] + [f"encoder.encoder.layer.{i}" for i in range(6)]
    assert not any("pooler" in n for b in bb.blocks for n in b.param_names)


def test_cli_compare_on_text(tmp_path):
    data = write_text_csv(tmp_path / "small.tsv", topic_sentences(15, seed=1), delimiter="\t")
    proc = invoke_cli(
        "compare",
        str(data),
        "--strategies",
        "feature-extraction,finetune:last=1",
        "--epochs",
        "1",
        "--max-length",
        "32",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path / "cmp"),
        "-q",
    )
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["strategy"] for r in result["results"]] == ["feature-extraction", "finetune:last=1"]
    assert result["results"][0]["trainable_params"] == 4 * 384 + 4  # the head only
    assert result["results"][0]["test_accuracy"] > 0.5 and "texts, 4 classes" in proc.stdout


# --------------------------------------------------------------------------- bad input


def test_missing_column_lists_the_columns(tmp_path):
    data = write_text_csv(tmp_path / "d.csv", [("a b", "x")] * 3, header=("sentence", "label"))
    with pytest.raises(DataError, match=r"no column 'text'. Its columns: sentence, label.*--text-column"):
        load_text_data(data)
    proc = invoke_cli("fit", str(data), "--text-column", "body", check=False)
    assert proc.returncode == 1 and "no column 'body'" in proc.stderr and "sentence, label" in proc.stderr


def test_empty_texts_are_skipped_and_counted(tmp_path):
    rows = [*topic_sentences(6), ("   ", "sports"), ("", "weather"), ("No label here", "")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    splits = load_text_data(data)
    assert sum(splits.sizes().values()) == 24
    assert splits.summary.to_dict()["skipped"] == {"empty text": 2, "incomplete row": 1}
    assert "Skipped 3 of 27" in splits.summary.line()


def test_too_few_examples_and_conflicting_labels(tmp_path):
    rows = [(f"sentence {i}", "a") for i in range(5)] + [("lonely", "b"), ("twice", "b")]
    with pytest.raises(DataError, match=r"Class 'b' .* has 2 text"):
        load_text_data(write_text_csv(tmp_path / "few.csv", rows))
    rows = [(f"sentence {i}", "a") for i in range(5)] + [(f"other {i}", "b") for i in range(5)] + [("sentence 0", "b")]
    splits = load_text_data(write_text_csv(tmp_path / "conflict.csv", rows))
    assert splits.summary.to_dict()["skipped"] == {"conflicting labels": 2}


@pytest.mark.subprocess
def test_predict_rejects_a_bare_string_and_help_does_not_import_transformers():
    with pytest.raises(UsageError, match="list of texts"):
        TextClassifier()._splits("just one string", ["a"], 0)
    code = "import sys, transferkit.cli.app; assert 'transformers' not in sys.modules and 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
