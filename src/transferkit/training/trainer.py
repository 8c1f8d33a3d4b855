"""The phase runner: one fit's phases on one backbone, with no modality code.

It builds the loaders (through the backbone contract: its dataset and
collate, the distributed sampler for either modality), freezes what each
phase declares, applies the BatchNorm policy, trains heads on cached
features, trains the top blocks on the frozen prefix's cached outputs where it
can, and writes a checkpoint after every epoch. The loop itself is
:func:`transferkit.training.loop.run_phase`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from transferkit import distributed
from transferkit.backbones import freeze, lora
from transferkit.backbones.base import Backbone, NoPrefix, PrefixSplit
from transferkit.cache.features import FeatureCache, cached_features_info
from transferkit.cache.pixels import decode_once
from transferkit.data.examples import DataSplits
from transferkit.errors import RunError, UsageError
from transferkit.inference.extraction import Cut, predict_logits, prefix_cut
from transferkit.training.checkpoints import Checkpoints, ResumeState, checkpoint_position
from transferkit.training.config import FINETUNE_LR, HEAD_LR, TrainConfig
from transferkit.training.loop import Hooks, PhaseResult, PhaseSpec, run_phase
from transferkit.training.probe import fit_linear_probe
from transferkit.training.strategies import (
    AUTO_CANDIDATE,
    AutoDecision,
    Phase,
    Strategy,
    decide_after_trial,
    decide_before_trial,
    plan_phases,
)

log = logging.getLogger(__name__)


@dataclass
class Precision:
    """Autocast dtypes: for frozen work (extraction, prediction) and for training (None = fp32)."""

    infer: torch.dtype | None
    train: torch.dtype | None


class Trainer:
    """Runs the phases of one fit: loaders, freezing and BatchNorm policy, checkpoints; the engine does the loop."""

    def __init__(
        self,
        bb: Backbone,
        splits: DataSplits,
        cfg: TrainConfig,
        *,
        device: torch.device,
        precision: Precision,
        bn: str = "all-frozen",
        cache: FeatureCache | None = None,
        cache_budget_gb: float = 0.0,
        progress: bool = False,
        checkpoints: Checkpoints | None = None,
    ):
        self.bb, self.splits, self.cfg, self.device = bb, splits, cfg, device
        self.dtype, self.train_dtype = precision.infer, precision.train
        self.bn, self.progress, self.checkpoints = bn, progress, checkpoints
        self.cache = cache or FeatureCache.default(enabled=False)
        self.cache_budget = int(cache_budget_gb * 1e9)
        self.cache_hits: dict[str, str] = {}  # per split: "hit", "miss" or "off"
        self.feature_engine: str | None = None  # the engine and precision that computed (or cached) the features
        self.feature_seconds: dict[str, float] = {}  # per split: computing (miss) or reading (hit) its pooled features
        self.phase_notes: dict[str, dict] = {}
        self._features: dict[str, np.ndarray] = {}
        self._last_loop: dict | None = None  # the loop state of the latest epoch
        self.probe_val_pred: np.ndarray | None = None  # the latest probe's validation predictions
        self.on_epochs: Callable[[list[dict]], None] = lambda rows: None  # history rows so far (experiment tracking)

    # ------------------------------------------------------------------ data

    def features(self, split: str) -> np.ndarray:
        if split not in self._features:
            start = time.perf_counter()
            arr, self.cache_hits[split] = self._cached(split)
            self.feature_seconds[split] = round(time.perf_counter() - start, 3)
            self._features[split] = np.asarray(arr, dtype=np.float32)
        return self._features[split]

    def _cached(self, split: str, cut: Cut | None = None) -> tuple[np.ndarray, str]:
        """The cut's outputs (default pooled features) for a split, and 'hit', 'miss' or 'off' for the cache."""
        examples = getattr(self.splits, split)
        what = "features" if cut is None else "frozen blocks"
        arr, hit, engine = cached_features_info(
            self.bb,
            examples,
            cache=self.cache,
            device=self.device,
            dtype=self.dtype,
            workers=self.cfg.workers,
            progress=self.progress,
            engine=self.cfg.engine,
            label=f"{what}: {split} ({len(examples)} {self.bb.noun})",
            cut=cut,
        )
        self.feature_engine = f"{engine.name} {engine.precision}"  # transferkit.json's feature_cache.engine
        status = "hit" if hit else ("miss" if self.cache.enabled else "off")
        log.info(
            "%s of %s %s: %s",
            what.capitalize(),
            split,
            self.bb.noun,
            {"hit": "from the feature cache", "miss": "computed and cached", "off": "computed (cache off)"}[status],
        )
        return arr, status

    def _feature_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.features(split)), torch.from_numpy(getattr(self.splits, split).labels)

    def _feature_loader(self, split: str, shuffle: bool):
        data = torch.utils.data.TensorDataset(*self._feature_tensors(split))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.utils.data.DataLoader(data, batch_size=self.cfg.batch_size, shuffle=shuffle, generator=gen)

    def example_loader(self, split: str, train: bool):
        """Batches of (inputs, labels, indices) through the backbone's preprocessing: what image and text phases read."""
        examples = getattr(self.splits, split)
        workers = examples.loader_workers() if self.cfg.workers is None else self.cfg.workers
        data = self.bb.dataset(examples, self.cfg.augment if train else "none")
        return self._loader(data, train, workers, self.bb.collate)

    def _loader(self, data: torch.utils.data.Dataset, train: bool, workers: int = 0, collate: Callable | None = None):
        """Training: this process's share of each seeded global batch. Evaluation: its contiguous shard, in order."""
        assert isinstance(data, Sized), "map-style datasets only"
        gen = torch.Generator().manual_seed(self.cfg.seed)  # seeds the loader's workers
        if not train:
            if distributed.active():
                data = torch.utils.data.Subset(data, distributed.shard(len(data)))
            return torch.utils.data.DataLoader(data, batch_size=self.cfg.batch_size, generator=gen, num_workers=workers, collate_fn=collate)
        return torch.utils.data.DataLoader(
            data,
            batch_size=distributed.local_batch(self.cfg.batch_size),
            sampler=distributed.train_sampler(len(data), self.cfg.seed),
            generator=gen,
            num_workers=workers,
            drop_last=len(data) > self.cfg.batch_size,
            collate_fn=collate,
        )

    def _example_loaders(self, phase_name: str) -> tuple:
        """Train and validation loaders over examples: stored pixels where they allow it (decode once), else decoding."""
        splits = {"train": (self.splits.train, self.cfg.augment), "val": (self.splits.val, "none")}
        data, self.phase_notes[phase_name]["decoded_cache"] = decode_once(
            self.bb, splits, self.cache, self.cache_budget, workers=self.cfg.workers, progress=self.progress
        )
        return tuple(self._loader(data[s], s == "train") if s in data else self.example_loader(s, s == "train") for s in splits)

    def _class_weights(self) -> torch.Tensor | None:
        if self.cfg.class_weights is None:
            return None
        counts = np.bincount(self.splits.train.labels, minlength=len(self.splits.classes)).astype(np.float32)
        return torch.from_numpy(counts.sum() / (len(counts) * np.maximum(counts, 1)))

    # ------------------------------------------------------------------ phases

    def run_all(self, phases: list[Phase], resume: bool = False) -> list[PhaseResult]:
        """Run every phase in order; with `resume`, skip finished phases and continue the current one exactly."""
        state = self.checkpoints.read() if resume and self.checkpoints else None
        if state is not None and state.extend is not None:
            state = self._reopen_last_phase(state, phases)
        if state is not None and self.checkpoints is not None:
            log.info("Resuming from checkpoint %s: %s.", self.checkpoints.path, _resume_position(state, phases))
        results: list[PhaseResult] = []
        for i, phase in enumerate(phases):
            if state is not None and i < state.phase_index:
                results.append(PhaseResult(**state.results[i]))
                self.phase_notes[phase.name] = state.notes.get(phase.name, {})
                self.on_epochs(results[-1].history)
                continue
            loop = state.loop if state is not None and i == state.phase_index else None
            if state is not None and loop is None and i == state.phase_index:
                self._restore_model(state.model)  # the phase had finished: restore its result
            results.append(self.run(phase, i, results, loop))
            self.on_epochs(results[-1].history)
            if state is not None and i == state.phase_index:
                state = None
            self._checkpoint(
                i + 1,
                "done" if i + 1 == len(phases) else phases[i + 1].name,
                results,
                None,
                final_loop=self._last_loop if i + 1 == len(phases) else None,
                phase_epochs=None if i + 1 == len(phases) else phases[i + 1].epochs,
            )
        if state is not None:  # every phase had finished before the interruption
            self._restore_model(state.model)
        return results

    def _reopen_last_phase(self, state: ResumeState, phases: list[Phase]) -> ResumeState:
        """`--resume --epochs N` with N larger than before: the last phase continues to N epochs.

        An interrupted phase simply runs on; a finished one is reopened from its last epoch (optimizer,
        scheduler, random state and best weights as they were). The cosine schedule is recomputed for N
        epochs, so the learning rate resumes where the longer schedule is at the epoch reached and decays to
        zero at N; the best epoch on validation is still kept, across the old and new epochs.
        """
        assert state.extend is not None and self.checkpoints is not None, "called only to extend a resumed fit"
        (old, new), last = state.extend, len(phases) - 1
        if state.phase_index > last:
            if not state.final_loop:
                raise UsageError(
                    f"{self.checkpoints.path} holds no state of its last epoch (written by an older "
                    "transferkit), so it cannot be extended; fit again with --overwrite --epochs "
                    f"{new}."
                )
            state = state.with_(phase_index=last, loop=state.final_loop, results=state.results[:last])
        if phases[last].on_features:
            raise UsageError(
                f"--epochs {new}: this strategy's phases train on cached features only and take no "
                "--epochs; resume with the options it was fitted with."
            )
        log.warning(
            "Extending the fit from %d to %d epochs: the %s phase continues from epoch %d, on a cosine schedule recomputed for %d epochs.",
            old,
            new,
            phases[last].name,
            (state.loop or {}).get("epoch", 0),
            new,
        )
        return state

    def _restore_model(self, state: dict | None) -> None:
        """Load a checkpoint's model; one saved with LoRA adapters gets them added first (a lora phase had run)."""
        if state is None:
            raise RunError(
                f"{self.checkpoints.path if self.checkpoints else 'The checkpoint'} holds no model weights "
                "between phases; it is damaged. Fit again with --overwrite."
            )
        if lora.saved_with_adapters(state) and not lora.is_adapted(self.bb.model):
            lora.add_adapters_(self.bb)
        self.bb.model.load_state_dict(state)

    def _checkpoint(
        self,
        phase_index: int,
        phase_name: str,
        results: list[PhaseResult],
        loop: dict | None,
        final_loop: dict | None = None,
        phase_epochs: int | None = None,
    ) -> None:
        """`final_loop`: the last phase's last epoch, kept in the finished checkpoint so `--epochs` can extend it."""
        if self.checkpoints is None:
            return
        self.checkpoints.write(
            ResumeState(
                phase_index=phase_index,
                phase=phase_name,
                epoch=loop["epoch"] if loop else 0,
                trainable_blocks=self.trainable_block_names(),
                bn=self.bn,
                loop=loop,
                model=self.bb.model.state_dict() if loop is None else None,
                final_loop=final_loop,
                phase_epochs=phase_epochs,
                results=[vars(r) for r in results],
                notes=self.phase_notes,
            )
        )

    def trainable_block_names(self) -> list[str]:
        params = dict(self.bb.model.named_parameters())
        return [b.name for b in self.bb.blocks if any(params[n].requires_grad for n in b.param_names)]

    def run(self, phase: Phase, index: int = 0, done: list[PhaseResult] | None = None, resume: dict | None = None) -> PhaseResult:
        if phase.on_features:
            return self.run_head_on_features(phase)
        if phase.adapters:
            lora.add_adapters_(self.bb)  # blocks become the adapters: 'all blocks' below trains adapters + head
        return self._run_on_examples(phase, index, done or [], resume)

    def run_head_on_features(self, phase: Phase) -> PhaseResult:
        """Fit the head on cached features: on rank 0 only under torchrun, its weights and result then broadcast."""
        freeze.set_trainable_(self.bb, 0)
        for split in ("train", "val"):  # every process takes part in the (sharded) extraction
            self.features(split)
        head = self.bb.head()
        result, state, notes = distributed.on_main(lambda: (self._fit_head(phase), head.state_dict(), self.phase_notes[phase.name]))
        head.load_state_dict(state)
        self.phase_notes[phase.name] = notes
        with torch.no_grad():  # what the probe predicts on validation: auto's paired test compares a trial with it
            self.probe_val_pred = head.cpu().eval()(torch.from_numpy(self.features("val"))).argmax(1).numpy()
        return result

    def _fit_head(self, phase: Phase) -> PhaseResult:
        if phase.solver == "lbfgs":
            linear = self.bb.head()
            assert isinstance(linear, nn.Linear), f"the probe fits a linear head; {self.bb.spec.arch} has {type(linear).__name__}"
            result = fit_linear_probe(
                linear, self._feature_tensors("train"), self._feature_tensors("val"), progress=self.progress, name=phase.name
            )
            self.phase_notes[phase.name] = {"trainable_blocks": [], "solver": "lbfgs", "C": result.history[result.best_epoch - 1]["C"]}
            return result
        head, head_lr = self.bb.head(), self.cfg.lr or HEAD_LR
        groups = [{"name": "head", "params": list(head.parameters()), "lr_scale": 1.0}]
        self.phase_notes[phase.name] = {"trainable_blocks": [], "solver": "adamw", "lrs": {"head": head_lr}}
        spec = PhaseSpec(
            phase.name, phase.epochs, head_lr, self.cfg, torch.device("cpu"), class_weights=self._class_weights(), progress=self.progress
        )
        return run_phase(head, groups, self._feature_loader("train", True), self._feature_loader("val", False), spec)

    def _phase_groups(self, phase: Phase, cap: int) -> tuple[list[dict], float]:
        """Param groups (with lr scales) and the head's rate for an image or text phase."""
        head_lr, cfg = self.cfg.lr or FINETUNE_LR, self.cfg
        if phase.adapters:  # LoRA: the adapters start at zero and train at the head's rate (Hu et al. 2021)
            return freeze.param_groups(self.bb, cap, 1.0, 1.0, cfg.weight_decay), head_lr
        if phase.uniform_lr:  # LP-FT: head and blocks at the backbone's (small) rate
            return freeze.param_groups(self.bb, cap, 1.0, 1.0, cfg.weight_decay), head_lr * cfg.backbone_lr_scale
        return freeze.param_groups(self.bb, cap, cfg.backbone_lr_scale, cfg.layer_decay, cfg.weight_decay), head_lr

    def _run_on_examples(self, phase: Phase, index: int, done: list[PhaseResult], resume: dict | None) -> PhaseResult:
        n_blocks = len(self.bb.blocks)
        cap = phase.trainable_count(n_blocks, epoch=n_blocks)  # most blocks this phase ever trains
        groups, lr = self._phase_groups(phase, cap)
        freeze.set_trainable_(self.bb, cap)
        model = self.bb.model.to(self.device).to(memory_format=torch.channels_last)
        loaders, prefix_note = self._prefix_loaders(phase, cap)
        self.phase_notes[phase.name] = {
            "trainable_blocks": [b.name for b in self.bb.blocks[n_blocks - cap :]],
            "lrs": {g["name"]: lr * g["lr_scale"] for g in groups},
            "bn": self.bn,
            "prefix_cache": prefix_note,
        }
        if loaders is None:
            loaders = (*self._example_loaders(phase.name), model)

        def train_mode() -> None:
            model.train()
            freeze.set_bn_modes_(self.bb, self.bn)

        def epoch_end(loop: dict) -> None:
            self._last_loop = loop
            self._checkpoint(index, phase.name, done, loop, phase_epochs=phase.epochs)
            self.on_epochs(loop["history"])

        hooks = Hooks(
            epoch_start=lambda epoch: freeze.set_trainable_(self.bb, phase.trainable_count(n_blocks, epoch)),
            train_mode=train_mode,
            epoch_end=epoch_end,
        )
        # The weights handed in (the probe's head) compete too: a phase never ends worse on validation.
        start_best = max((r.best_val_acc for r in done), default=-1.0)
        spec = PhaseSpec(
            phase.name,
            phase.epochs,
            lr,
            self.cfg,
            self.device,
            self.train_dtype,
            phase.warmup_epochs,
            self._class_weights(),
            self.progress,
            distributed.Replicas.create(self.device),
            start_best,
        )
        train_loader, val_loader, trained = loaders
        result = run_phase(trained, groups, train_loader, val_loader, spec, hooks, resume)
        if result.best_epoch == 0:
            self.phase_notes[phase.name]["kept_previous"] = True
            log.warning("%s: no epoch beat the previous phase on validation (%.4f); its weights are kept.", phase.name, start_best)
        return result

    def _prefix_loaders(self, phase: Phase, top_blocks: int) -> tuple[tuple | None, dict]:
        """Frozen-prefix caching: (train loader, val loader, module) over the frozen blocks' cached outputs.

        When the blocks below the trainable ones stay frozen for the whole phase
        and the inputs are not augmented, their output per example never changes:
        it is computed once into the feature cache and the phase trains only the
        rest of the network on it. Returns None and the reason when not used.
        """
        split = self._prefix_split(phase, top_blocks)
        if isinstance(split, NoPrefix):
            return None, {"used": False, "reason": split.reason}
        cut = prefix_cut(split, self.bb.data_config["input_size"])
        n = len(self.splits.train) + len(self.splits.val)
        size = n * cut.size * 2  # float16
        if size > self.cache_budget:
            reason = (
                f"the outputs of the frozen blocks (up to {split.cut}) would take {_gb(size)} on disk for "
                f"{n} {self.bb.noun}, over the cache budget of {_gb(self.cache_budget)}; training on "
                f"{self.bb.noun} instead. Raise --cache-budget (cache_budget_gb) to at least {_gb(size)} to train "
                "on cached outputs."
            )
            if distributed.is_main():
                log.warning("Frozen-prefix cache refused: %s", reason)
            return None, {"used": False, "reason": reason, "bytes": size}
        (train, train_hit), (val, val_hit) = self._cached("train", cut), self._cached("val", cut)
        if distributed.is_main():
            log.info(
                "Frozen-prefix cache: blocks up to %s computed once (%s, train %s, val %s); %s trains the rest on them.",
                split.cut,
                _gb(size),
                train_hit,
                val_hit,
                phase.name,
            )
        note = {"used": True, "cut": split.cut, "item_shape": list(cut.shape), "bytes": size, "train": train_hit, "val": val_hit}
        train_loader = self._loader(CachedOutputs(train, self.splits.train.labels, cut.shape), train=True)
        val_loader = self._loader(CachedOutputs(val, self.splits.val.labels, cut.shape), train=False)
        return (train_loader, val_loader, TrainsThrough(split.suffix, self.bb.model)), note

    def _prefix_split(self, phase: Phase, top_blocks: int) -> PrefixSplit | NoPrefix:
        """Where the phase's frozen blocks end, or why its inputs cannot be cached."""
        if phase.gradual:
            return NoPrefix("gradual unfreezing changes the frozen blocks every epoch")
        if self.cfg.augment != "none":
            return NoPrefix(f"augment={self.cfg.augment}: the frozen blocks see a new view of each example every epoch")
        if not self.cache.enabled:
            return NoPrefix("the feature cache is off")
        if self.cache_budget <= 0:
            return NoPrefix("the cache budget is 0")
        return self.bb.prefix_split(top_blocks)

    def min_per_class(self) -> int:
        return int(np.bincount(self.splits.train.labels).min())

    def logits(self, split: str, last: Phase) -> np.ndarray:
        """The model's logits on a split, in order: through the head on cached features when it trained on them."""
        if last.on_features:
            head = self.bb.head().cpu().eval()
            with torch.no_grad():
                return head(torch.from_numpy(self.features(split))).numpy()
        logits, _ = predict_logits(self.bb.model, self.example_loader(split, False), self.device, self.dtype, engine=self.cfg.engine)
        return distributed.gather_rows(logits)  # each process predicted its shard


def _resume_position(state: ResumeState, phases: list[Phase]) -> str:
    """Where a resumed fit continues: "phase finetune, epoch 2 of 5", "before the first epoch of finetune", ..."""
    running = phases[state.phase_index] if state.phase_index < len(phases) else None
    epoch = (state.loop or {}).get("epoch", state.epoch) if state.loop is not None else 0
    return checkpoint_position(
        {"phase": running.name if running else "done", "epoch": epoch, "phase_epochs": running.epochs if running else None}
    )


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


class CachedOutputs(torch.utils.data.Dataset):
    """(output, label) pairs from a float16 array of flattened frozen-block outputs, read row by row (mmap-friendly)."""

    def __init__(self, outputs: np.ndarray, labels: np.ndarray, shape: tuple[int, ...]):
        self.outputs, self.labels, self.shape = outputs, labels, shape

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.asarray(self.outputs[i], dtype=np.float32)).view(self.shape), int(self.labels[i])


class TrainsThrough(nn.Module):
    """Runs `part` (the trainable top of `model`, sharing its parameters); its state is the whole model's.

    So checkpoints, best-weights restore and resume see the full model whichever path trained it.
    """

    def __init__(self, part: nn.Module, model: nn.Module):
        super().__init__()
        self.part = part
        self._model = [model]  # a list: not registered, so state_dict is not duplicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part(x)

    def state_dict(self, *args, **kwargs):
        return self._model[0].state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self._model[0].load_state_dict(state_dict, strict=strict, assign=assign)


def run_strategy(
    trainer: Trainer, strategy: Strategy, cfg: TrainConfig, fresh_backbone: Callable[[], Backbone], resume: bool = False
) -> tuple[Strategy, list[Phase], list[PhaseResult], AutoDecision | None]:
    """Run a strategy's phases; `auto` decides first from the probe, or trials its candidate, and says why.

    `fresh_backbone` gives the pretrained backbone again when auto keeps the probe after a trial.
    """
    from transferkit.training.strategies import probe_line, trial_reason

    decision, trial = None, False
    if strategy.kind == "auto":
        probe = trainer.run_head_on_features(Phase("head", 0, 1, on_features=True, solver="lbfgs"))
        log.info("%s", probe_line(trainer.min_per_class(), probe.best_val_acc))
        decision = decide_before_trial(trainer.min_per_class(), probe.best_val_acc)
        trial = decision is None
        if trial:
            log.info("%s", trial_reason(trainer.min_per_class(), probe.best_val_acc))
        strategy = AUTO_CANDIDATE if decision is None else decision.strategy
    phases = plan_phases(strategy, cfg.epochs, cfg.head_epochs, len(trainer.bb.blocks))
    results = trainer.run_all(phases, resume=resume)
    if trial:
        labels = trainer.splits.val.labels
        decision = decide_after_trial(
            trainer.min_per_class(),
            trainer.probe_val_pred == labels,
            trainer.logits("val", phases[-1]).argmax(1) == labels,
            results[0].seconds,
            sum(r.seconds for r in results),
        )
        if decision.strategy != strategy:  # keep the probe: back to pretrained weights, refit the head
            log.info("auto: %s gains no more than noise over the probe; refitting the head on the pretrained backbone", strategy.spec)
            strategy = decision.strategy
            trainer.bb = fresh_backbone()
            phases = plan_phases(strategy, cfg.epochs, cfg.head_epochs, len(trainer.bb.blocks))
            results = trainer.run_all(phases)
    if decision is not None:
        log.info("auto chose %s: %s", decision.strategy.spec, decision.reason)
    return strategy, phases, results, decision
