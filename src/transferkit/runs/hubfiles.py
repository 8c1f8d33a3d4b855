"""The files that make a run directory a Hub repository: timm's ``config.json`` and the model card ``README.md``.

An image run is laid out as timm publishes a model on the Hugging Face Hub:
``model.safetensors`` (timm's own parameter names) beside ``config.json`` written
by timm itself (``timm.models._hub.save_config_for_hf``: ``architecture``,
``num_classes``, ``num_features``, ``label_names``, ``model_args`` and a
``pretrained_cfg`` holding the run's input size, mean, std, interpolation and
crop). So plain timm loads a run without transferkit::

    model = timm.create_model("local-dir:runs/plants", pretrained=True)
    model.pretrained_cfg["label_names"]          # the classes, in logit order
    timm.data.resolve_model_data_config(model)   # the run's preprocessing

Text runs keep transformers' own format (``encoder/``, see
:mod:`transferkit.backbones.text`) and get the model card only. Both files are
written into the run's staging folder by :func:`transferkit.runs.directory.save_run`, so
they appear together with the model or not at all.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

from transferkit.atomic import write_atomic
from transferkit.runs.card import model_card
from transferkit.runs.meta import RunMeta

CONFIG_FILE = "config.json"  # timm's hub config (the name timm's loaders look for)
CARD_FILE = "README.md"  # the model card (the name the Hub renders)


def write_hub_files(stage: Path, backbone, meta: RunMeta, name: str) -> None:
    """timm's config.json (image runs) and the model card, into the folder that becomes run `name`."""
    if backbone.modality == "image":
        write_timm_config(stage / CONFIG_FILE, backbone.model, meta)
    write_atomic(stage / CARD_FILE, model_card(meta.to_dict(), name))


def write_timm_config(path: Path, model, meta: RunMeta) -> None:
    """config.json as timm writes it for the Hub, with the run's classes and preprocessing.

    timm's own writer describes the model (architecture, pooling, reconstruction
    arguments); the run adds what timm cannot know: the class names and the
    preprocessing the head was trained with. A LoRA model is described by the
    plain architecture its merged weights load into.
    """
    from timm.models._hub import save_config_for_hf

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the timm model
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.data_config.items()}
    extra = {"label_names": list(meta.classes)}
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / CONFIG_FILE
        if "data_config" in inspect.signature(save_config_for_hf).parameters:
            save_config_for_hf(model, str(written), model_config=extra, data_config=data_config)
        else:  # older timm takes the preprocessing from model.pretrained_cfg only
            saved = model.pretrained_cfg
            model.pretrained_cfg = {**saved, **data_config, "num_classes": model.num_classes}
            try:
                save_config_for_hf(model, str(written), model_config=extra)
            finally:
                model.pretrained_cfg = saved
        config = json.loads(written.read_text(encoding="utf-8"))
    write_atomic(path, json.dumps(config, indent=2) + "\n")
