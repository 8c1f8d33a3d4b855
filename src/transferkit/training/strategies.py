"""Strategies as data: each is a list of phases the one engine runs.

A phase says which blocks train (counted from the top), at what learning
rates (head lr, a lower backbone lr, decaying per block going down), for how
many epochs, what BatchNorm does, and whether it can train on cached features
(nothing before the head changes). No strategy writes its own loop.

Spec strings:

=====================  ==========================================================
``feature-extraction``  backbone frozen, head trained on cached features
                        (aliases ``linear-probe``, ``transfer``)
``finetune:last=N``     head + the last N blocks train
``finetune:all``        head + every block trains (plain ``finetune`` is this)
``lp-ft``               probe on cached features, then fine-tune all from it
``gradual``             one more block unfrozen from the top each epoch (ULMFiT)
``lora``                probe, then LoRA adapters on every block's attention/MLP
                        projections + the head train; pretrained weights stay frozen
``auto``                chosen from the data; the reasons are recorded
=====================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from transferkit.errors import UsageError, did_you_mean

KINDS = ("feature-extraction", "finetune", "lp-ft", "gradual", "lora", "auto")
ALIASES = {
    "linear-probe": "feature-extraction",
    "transfer": "feature-extraction",
    "probe": "feature-extraction",
    "fine-tune": "finetune",
    "lpft": "lp-ft",
}
BN_POLICIES = ("all-frozen", "frozen-blocks")  # the first is the default: see ImageClassifier(bn=...)


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy spec. `last` is the number of top blocks that train (None = all)."""

    kind: str
    last: int | None = None

    @property
    def spec(self) -> str:
        if self.kind == "finetune":
            return "finetune:all" if self.last is None else f"finetune:last={self.last}"
        return self.kind


@dataclass(frozen=True)
class Phase:
    """One stretch of training with a fixed set of trainable blocks.

    Attributes:
        name: shown in progress and history ("head", "finetune", ...).
        train_blocks: how many blocks from the top train; 0 = head only, None = all.
        epochs: length of the phase.
        on_features: train the head on cached pooled features instead of images.
        gradual: unfreeze one more block from the top each epoch (train_blocks is the cap).
        warmup_epochs: linear learning-rate warmup before the cosine decay.
        solver: for a head on features, "lbfgs" (logistic regression, C chosen on
            validation; epochs unused) or "adamw" (epochs of minibatch AdamW).
        uniform_lr: every group at the backbone rate (LP-FT) instead of a faster
            head and layer-wise decay below it.
        adapters: add LoRA adapters first; the blocks that train are then the
            adapters of each block (the pretrained weights stay frozen).
    """

    name: str
    train_blocks: int | None
    epochs: int
    on_features: bool = False
    gradual: bool = False
    warmup_epochs: float = 0.0
    solver: str = "adamw"
    uniform_lr: bool = False
    adapters: bool = False

    def trainable_count(self, n_blocks: int, epoch: int = 0) -> int:
        """Number of top blocks trainable at `epoch` of this phase."""
        cap = n_blocks if self.train_blocks is None else min(self.train_blocks, n_blocks)
        return min(cap, epoch + 1) if self.gradual else cap


def parse_strategy(spec: str) -> Strategy:
    """Parse a strategy spec string.

    Example:
        >>> parse_strategy("finetune:last=2")
        Strategy(kind='finetune', last=2)

    Raises:
        UsageError: the spec names no strategy or has a bad argument; says the valid forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"strategy must be a non-empty string; got {spec!r}. Valid: {', '.join(KINDS)}.")
    text = spec.strip().lower()
    head, _, arg = text.partition(":")
    kind = ALIASES.get(head, head)
    if kind not in KINDS:
        names = list(KINDS) + list(ALIASES)
        raise UsageError(
            f"Unknown strategy '{spec}'.{did_you_mean(head, names)} Valid: feature-extraction, "
            "finetune:last=N, finetune:all, lp-ft, gradual, lora, auto."
        )
    if kind != "finetune":
        if arg:
            raise UsageError(f"Strategy '{kind}' takes no argument; got '{spec}'.")
        return Strategy(kind)
    if arg in ("", "all"):
        return Strategy("finetune", None)
    key, _, value = arg.partition("=")
    # ASCII digits only: str.isdigit() accepts '²', which int() rejects; 9 digits bounds int()'s work.
    if key != "last" or not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) < 1:
        raise UsageError(f"Bad fine-tuning spec '{spec}': write finetune:last=N with N >= 1, or finetune:all.")
    return Strategy("finetune", int(value))


def plan_phases(strategy: Strategy, epochs: int | None, head_epochs: int | None, n_blocks: int) -> list[Phase]:
    """The phases a strategy runs.

    Args:
        strategy: a parsed, non-auto strategy.
        epochs: epochs of the image phase (fine-tuning); None takes the default.
        head_epochs: epochs of the cached-features head phase; None takes the default.
        n_blocks: number of backbone blocks, to validate `last`.
    """
    if strategy.kind == "auto":
        raise UsageError("'auto' must be resolved to a concrete strategy before planning (see transferkit.auto).")
    if strategy.last is not None and strategy.last > n_blocks:
        raise UsageError(
            f"finetune:last={strategy.last} asks for more blocks than the backbone has ({n_blocks}). "
            f"Use finetune:last=N with N <= {n_blocks}, or finetune:all."
        )
    # Head on cached features: L-BFGS logistic regression with C chosen on validation
    # (seconds), or AdamW epochs when head_epochs is given (milliseconds each).
    head = Phase("head", 0, head_epochs or DEFAULT_HEAD_EPOCHS, on_features=True, solver="adamw" if head_epochs else "lbfgs")
    ft_epochs = epochs or DEFAULT_FINETUNE_EPOCHS
    if strategy.kind == "feature-extraction":
        return [head]
    # Every fine-tuning strategy warm-starts the new head on frozen features first, so
    # the first steps do not push random-head gradients into pretrained blocks
    # (Kumar et al. 2022); the probe costs seconds since features are cached.
    if strategy.kind == "finetune":
        return [head, Phase("finetune", strategy.last, ft_epochs, warmup_epochs=1)]
    if strategy.kind == "lp-ft":
        return [head, Phase("finetune", None, ft_epochs, warmup_epochs=1, uniform_lr=True)]
    if strategy.kind == "lora":
        return [head, Phase("lora", None, ft_epochs, warmup_epochs=1, adapters=True)]
    # ULMFiT: one more block per epoch from the top, so it needs at least as many epochs as blocks to reach all.
    return [head, Phase("gradual", None, max(ft_epochs, 1), gradual=True)]


DEFAULT_HEAD_EPOCHS = 30
DEFAULT_FINETUNE_EPOCHS = 5


# --------------------------------------------------------------------------- auto

AUTO_MIN_PER_CLASS = 5  # below this, fine-tuning's validation gain is noise
AUTO_PROBE_CEILING = 0.995  # frozen features already separate the validation set


@dataclass(frozen=True)
class AutoDecision:
    """What `auto` chose, the measurements it used and why, in words."""

    strategy: Strategy
    reason: str
    measurements: dict

    def to_dict(self) -> dict:
        return {"chosen": self.strategy.spec, "reason": self.reason, "measurements": self.measurements}

    @classmethod
    def from_dict(cls, d: dict) -> AutoDecision:
        return cls(parse_strategy(d["chosen"]), d["reason"], d.get("measurements", {}))


def decide_before_trial(per_class: int, probe_val: float) -> AutoDecision | None:
    """Decide from examples per class and the probe alone, or None when a fine-tuning trial must decide.

    Starts from the seed's when-to-use table: little data, or a task the frozen
    features already solve, means feature extraction.
    """
    fe = Strategy("feature-extraction")
    if per_class < AUTO_MIN_PER_CLASS:
        return AutoDecision(
            fe,
            f"only {per_class} training examples in the smallest class (< {AUTO_MIN_PER_CLASS}): "
            "too little data to fine-tune reliably, so the backbone stays frozen.",
            {"min_examples_per_class": per_class, "probe_val_acc": probe_val},
        )
    if probe_val >= AUTO_PROBE_CEILING:
        return AutoDecision(
            fe,
            f"the frozen features already reach {probe_val:.1%} validation accuracy "
            f"(>= {AUTO_PROBE_CEILING:.1%}): fine-tuning has nothing to gain.",
            {"min_examples_per_class": per_class, "probe_val_acc": probe_val},
        )
    return None


AUTO_CANDIDATE = Strategy("lp-ft")  # the most robust fine-tune across data sizes measured (Kumar et al. 2022)


def probe_line(per_class: int, probe_val: float) -> str:
    """What auto measured first, in words: the frozen-feature probe's validation accuracy."""
    return (
        f"auto: the frozen-feature probe reaches {probe_val:.1%} validation accuracy ({per_class} training examples in the smallest class)"
    )


def trial_reason(per_class: int, probe_val: float) -> str:
    """Why auto starts a fine-tuning trial (when :func:`decide_before_trial` returns None), in words."""
    return (
        f"auto: {per_class} examples per class (>= {AUTO_MIN_PER_CLASS}) and a probe below {AUTO_PROBE_CEILING:.1%} "
        f"leave room to gain, so it tries {AUTO_CANDIDATE.spec} and keeps it only if its validation gain over the "
        "probe is more than noise"
    )


def decide_after_trial(per_class: int, probe_correct, tuned_correct, probe_seconds: float, tuned_seconds: float) -> AutoDecision:
    """Keep the fine-tuned model only when its validation gain over the probe is more than noise, else the probe.

    The test: the paired bootstrap 95% interval of (fine-tuned minus probe) validation accuracy on the same
    examples (:func:`transferkit.stats.paired.paired_difference`, with the exact McNemar p-value recorded) must
    lie above 0. The trial is the candidate's own run, warm-started from the probe, so choosing fine-tuning
    costs nothing extra and choosing the probe costs one run.

    Args:
        per_class: training examples in the smallest class.
        probe_correct: per validation example, whether the frozen-feature probe got it right.
        tuned_correct: the same for the fine-tuned trial, same examples in the same order.
        probe_seconds: the probe's training time.
        tuned_seconds: the trial's training time (probe included).
    """
    from transferkit.stats.paired import paired_difference
    from transferkit.stats.wording import ratio_phrase

    d = paired_difference(tuned_correct, probe_correct)
    numbers = {
        "min_examples_per_class": per_class,
        "probe_val_acc": d.accuracy_b,
        "trial_strategy": AUTO_CANDIDATE.spec,
        "trial_val_acc": d.accuracy_a,
        "probe_seconds": round(probe_seconds, 2),
        "trial_seconds": round(tuned_seconds, 2),
        "val_gain": d.difference,
        "val_gain_low": d.low,
        "val_gain_high": d.high,
        "mcnemar_p": d.mcnemar_p,
        "n_val": d.n,
        "test": d.method,
    }
    gain = f"{d.difference * 100:+.1f} points of validation accuracy (95% CI {d.low * 100:.1f} to {d.high * 100:.1f}) on {d.n} examples"
    if d.significant and d.difference > 0:
        return AutoDecision(
            AUTO_CANDIDATE,
            f"{AUTO_CANDIDATE.spec} reaches {d.accuracy_a:.1%} validation accuracy vs "
            f"{d.accuracy_b:.1%} for the frozen-feature probe: a gain of {gain} "
            f"(paired bootstrap; McNemar p = {d.mcnemar_p:.2g}), more than noise, so "
            "the features are worth adapting.",
            numbers,
        )
    cost = ratio_phrase(probe_seconds, tuned_seconds, what="cost")
    return AutoDecision(
        Strategy("feature-extraction"),
        f"{AUTO_CANDIDATE.spec} reaches {d.accuracy_a:.1%} vs {d.accuracy_b:.1%} for the probe: a "
        f"difference of {gain} (paired bootstrap; McNemar p = {d.mcnemar_p:.2g}), an interval that "
        f"includes 0, so feature extraction is as accurate within noise at {cost}.",
        numbers,
    )
