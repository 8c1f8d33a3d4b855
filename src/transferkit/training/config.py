"""Training settings: one frozen, validated dataclass, the single source of every training default.

A bad value is refused when the config is made, before any data is read or a
feature extracted, with the parameter, the value received and the valid choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transferkit.cache import DEFAULT_CACHE_BUDGET_GB
from transferkit.errors import UsageError, check_choice, did_you_mean
from transferkit.inference.settings import (
    DEFAULT_ENGINE,
    DEVICES,
    ENGINE_VARIABLE,
    ENGINES,
    PRECISIONS,
    check_device,
    default_engine,
)

__all__ = [
    "DEFAULT_CACHE_BUDGET_GB",
    "DEFAULT_ENGINE",
    "DEVICES",
    "ENGINES",
    "ENGINE_VARIABLE",
    "PRECISIONS",
    "TrainConfig",
    "check_device",
    "default_engine",
]

OPTIMIZERS = ("adamw", "sgd")
AUGMENTATIONS = ("none", "light", "strong")
CLASS_WEIGHTS = (None, "auto")

HEAD_LR = 3e-3  # AdamW on pooled features: converges within 30 epochs on every backbone tried
# Fine-tuning: the head at 1e-3, the top block at 3e-4 (backbone_lr_scale), decaying 0.8 per
# block going down (the stem gets 6e-5). Pretrained blocks need less than a new head; one
# rate of 1e-3 everywhere is what collapses small-data runs (digits at 10/class: 81% -> 50%).
FINETUNE_LR = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by every strategy. None means 'the strategy's default'."""

    epochs: int | None = None  # fine-tuning epochs (image phases)
    head_epochs: int | None = None  # AdamW epochs of the head on cached features; None = L-BFGS probe
    lr: float | None = None  # head learning rate; None = FINETUNE_LR on images, HEAD_LR on features
    backbone_lr_scale: float = 0.3  # top trainable block's lr relative to the head's
    layer_decay: float = 0.8  # each block further down: lr * layer_decay
    weight_decay: float = 0.01  # AdamW's decoupled decay, per step times lr; never on 1-D parameters
    optimizer: str = "adamw"
    class_weights: str | None = None  # "auto": inverse class frequency in the loss
    batch_size: int = 32  # fine-tuning batch; 32 gives 40 steps/epoch on the digits demo
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; 0 or None disables
    accumulate: int = 1  # gradient accumulation steps
    patience: int | None = None  # early stopping on val accuracy; None = run all epochs
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None  # data loader processes; None = automatic
    augment: str = "none"
    engine: str = field(default_factory=default_engine)  # frozen passes: auto, torch or openvino

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("engine", self.engine, ENGINES)
        check_device(self.device)
        for name, kind, low, inclusive, optional in _RANGES:
            _check_number(name, kind, low, inclusive, optional, getattr(self, name))
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing must be in [0, 1); got {self.label_smoothing!r}.")
        if not 0 < self.layer_decay <= 1:
            raise UsageError(f"layer_decay must be in (0, 1]; got {self.layer_decay!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_settings(cls, settings: dict, owner: str = "TrainConfig") -> TrainConfig:
        """A config from keyword settings; None for a setting means its default."""
        unknown = [k for k in settings if k not in cls.names()]
        if unknown:
            raise UsageError(
                f"{owner} got an unknown setting '{unknown[0]}'.{did_you_mean(unknown[0], cls.names())} Valid: {', '.join(cls.names())}."
            )
        return cls(**{k: v for k, v in settings.items() if v is not None})


# (name, type, smallest allowed, whether the bound itself is allowed, whether None is allowed): checked before any work.
_RANGES = (
    ("epochs", int, 1, True, True),
    ("head_epochs", int, 1, True, True),
    ("lr", float, 0, False, True),
    ("backbone_lr_scale", float, 0, False, False),
    ("weight_decay", float, 0, True, False),
    ("batch_size", int, 1, True, False),
    ("grad_clip", float, 0, True, True),
    ("accumulate", int, 1, True, False),
    ("patience", int, 1, True, True),
    ("workers", int, 0, True, True),
    ("seed", int, 0, True, False),
)


def _check_number(name: str, kind: type, low: float, inclusive: bool, optional: bool, value) -> None:
    if value is None and optional:
        return
    ok_type = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or value != value:  # value != value: NaN
        raise UsageError(f"{name} must be {'an integer' if kind is int else 'a number'}; got {value!r}.")
    if value < low or (value == low and not inclusive):
        raise UsageError(f"{name} must be {'>=' if inclusive else '>'} {low}; got {value!r}.")
