"""A bad --model, or lora on a backbone without Linear layers in its blocks, is refused before any data is read,
in fit and in compare (issue 28: 13)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import write_folder
from transferkit import ImageClassifier, UsageError
from transferkit.cli.app import app


@pytest.fixture
def no_data_reads(monkeypatch):
    """Every way DATA is read fails the test: the settings must be refused first."""

    def read(*args, **kwargs):
        pytest.fail("the data was read before the settings were checked")

    import transferkit.data
    import transferkit.data.sources

    for module in (transferkit.data, transferkit.data.sources):
        for name in ("load_image_data", "load_text_data", "load_data"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, read)


@pytest.mark.parametrize(
    ("model", "strategy", "words"),
    [
        ("resnet1", "feature-extraction", "Unknown model 'resnet1'"),
        ("builtin:efficientnet_lite9", "feature-extraction", "Unknown built-in"),
        ("builtin:efficientnet_lite0", "lora", "has none (a convolutional network?)"),
        ("resnet18", "lora", "'resnet18' has none"),
    ],
)
def test_fit_refuses_a_bad_backbone_before_reading_data(tmp_path, no_data_reads, model, strategy, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        ImageClassifier(model, strategy=strategy).fit(write_folder(tmp_path / "colours", per_class=2))


@pytest.mark.parametrize("command", ["fit", "compare"])
def test_the_cli_refuses_a_bad_backbone_before_reading_data(tmp_path, no_data_reads, command):
    data = str(write_folder(tmp_path / "colours", per_class=2))
    out = ["--out", str(tmp_path / "out")]
    bad_model = CliRunner().invoke(app, [command, data, "--model", "resnet1", *out])
    assert bad_model.exit_code == 2, bad_model.output
    assert "Unknown model 'resnet1'" in bad_model.output
    lora = "--strategy" if command == "fit" else "--strategies"
    bad_lora = CliRunner().invoke(app, [command, data, "--model", "builtin:efficientnet_lite0", lora, "lora", *out])
    assert bad_lora.exit_code == 2, bad_lora.output
    assert "'lora'" in bad_lora.output and "finetune:last=N" in bad_lora.output


def test_lora_on_a_transformer_passes_the_check_without_weights():
    from transferkit.backbones.vision import check_image_backbone

    check_image_backbone("vit_tiny_patch16_224", lora=True)  # built on the meta device: no download, no memory
