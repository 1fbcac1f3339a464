"""Three-phase training of a compact network, with a dense baseline, checkpoints and a report.

Phases (each a number of epochs; each epoch ends with a test evaluation and a
checkpoint, so ``resume=True`` continues a stopped run exactly as if it had not
stopped):

0. ``dense`` (optional): the same architecture, same initialization, all
   channels, for comparison.
1. ``explore``: each step a selector (CUCB or random) picks the active channels,
   the step trains only them (:class:`~dce_kernels.optim.MaskedOptimizer`), and the
   selector learns from the saliency the layers report.
2. ``select`` (instant): keep the channels of highest mean saliency at the
   target fraction (random ones for the random selector).
3. ``finetune``: train the kept channels only; the others stay inactive.

Then the compact network is exported (:mod:`dce_kernels.compact`) and evaluated
on its own. ``report.json`` in the run directory holds accuracies, parameter
and FLOP counts of dense vs compact, reductions and wall-clock times.

Learning rate: cosine decay from the phase's base rate to zero within each
phase, computed from the step number (no scheduler state to checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..channels import ChannelPlan, plan_for
from ..compact import compact_model, export_compact
from .models import build_model
from ..optim import MaskedOptimizer
from ..selectors import DEFAULT_TAU
from .choices import BUDGETS, OPTIMIZERS, SELECTORS, check_choice
from .files import CHECKPOINT, CONFIG, EXPORT_STEM, REPORT
from .report import (CompactSummary, DenseSummary, EpochRecord, ExportInfo, PhaseTotals,
                     Reduction, RunReport, Selection)

__all__ = ["TrainConfig", "train", "PHASES"]

PHASES = ("dense", "explore", "finetune")


@dataclass
class TrainConfig:
    """Everything that defines a run (the CLI's options map onto these fields)."""

    model: str = "vgg11"
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    width: float = 1.0
    fraction: float = 0.5
    budget: str = "layer"
    selector: str = "cucb"
    tau: int = DEFAULT_TAU
    explore_epochs: int = 2
    finetune_epochs: int = 1
    dense_epochs: int = 3
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    run_dir: str = "runs/latest"
    progress: bool = True

    def validate(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")
        check_choice("selector", self.selector, SELECTORS)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.explore_epochs < 1:
            raise ValueError("explore_epochs must be >= 1: the selector needs to see data")
        if self.finetune_epochs < 0 or self.dense_epochs < 0 or self.tau < 0:
            raise ValueError("epoch counts and tau must be non-negative")
        if self.batch_size < 1 or self.lr <= 0 or self.finetune_lr <= 0:
            raise ValueError("batch_size, lr and finetune_lr must be positive")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of samples")

    def epochs(self, phase: str) -> int:
        return {"dense": self.dense_epochs, "explore": self.explore_epochs,
                "finetune": self.finetune_epochs}[phase]


def load_data(config: TrainConfig) -> tuple[Dataset, Dataset, dict]:
    """Train/test datasets (first ``*_limit`` samples) and their description."""
    from .data import dataset_info, load_dataset  # another module's job; imported on use

    info = dataset_info(config.dataset)
    train = load_dataset(config.dataset, config.data_dir, train=True)
    test = load_dataset(config.dataset, config.data_dir, train=False)
    return _limit(train, config.train_limit), _limit(test, config.test_limit), info


def _limit(ds: Dataset, n: Optional[int]) -> Dataset:
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def _describe(ds: Dataset, num_classes: Optional[int] = None) -> dict:
    x, _ = ds[0]
    if num_classes is None:
        labels = torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])
        num_classes = int(labels.max()) + 1
    return {"in_channels": int(x.shape[0]), "num_classes": int(num_classes),
            "image_size": int(x.shape[-1])}


class _Run:
    """The state of one run and the code that moves it forward."""

    def __init__(self, config: TrainConfig, train_ds: Dataset, test_ds: Dataset,
                 info: dict) -> None:
        self.config = config
        self.train_ds, self.test_ds, self.info = train_ds, test_ds, info
        self.device = torch.device(config.device)
        self.phase_index = 0 if config.dense_epochs > 0 else 1
        self.epoch = 0  # next epoch to run within the phase
        self.report = RunReport(config=dataclasses.asdict(config),
                                data={**info, "train_samples": len(train_ds),
                                      "test_samples": len(test_ds)})
        self.selection: Optional[list[torch.Tensor]] = None
        self._enter_phase(fresh=True)

    # -- construction ----------------------------------------------------------

    def _new_model(self) -> nn.Module:
        # Same seed for the dense baseline and the sparse run: same initial weights.
        torch.manual_seed(self.config.seed)
        model = build_model(self.config.model, self.info["in_channels"],
                            self.info["num_classes"], width=self.config.width,
                            image_size=self.info.get("image_size"))
        return model.to(self.device)

    def _new_selector(self, plan: ChannelPlan):
        return SELECTORS[self.config.selector](plan.num_channels, self.config)

    def _new_optimizer(self, lr: float) -> MaskedOptimizer:
        opt = OPTIMIZERS[self.config.optimizer](self.model.parameters(), lr, self.config)
        return MaskedOptimizer(opt, self.plan.active_blocks)

    @property
    def phase(self) -> str:
        return PHASES[self.phase_index]

    def _base_lr(self) -> float:
        return self.config.finetune_lr if self.phase == "finetune" else self.config.lr

    def _enter_phase(self, fresh: bool) -> None:
        """Builds what the current phase trains. ``fresh``: at a phase start
        (not when a checkpoint is about to overwrite the state)."""
        phase = self.phase
        # Fine-tuning continues the explored model, unless a checkpoint restores it.
        if phase != "finetune" or not fresh:
            self.model = self._new_model()
            self.plan = plan_for(self.model)
            self.selector = None if phase == "dense" else self._new_selector(self.plan)
        if phase == "dense":
            self.plan.apply(None)
        if phase == "finetune":
            if fresh:
                # Phase 2: keep the most salient channels (one selector call).
                self.selection = self.selector.best()
                self.report.selection = Selection(
                    channels_kept=[int(s.numel()) for s in self.selection],
                    channels_total=list(self.plan.num_channels),
                    indices=[s.tolist() for s in self.selection])
            self.plan.apply(self.selection)
        self.optimizer = self._new_optimizer(self._base_lr())

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "phase_index": self.phase_index, "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "selection": self.selection,
            "report": self.report.to_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state["config"])
        mine = dataclasses.asdict(self.config)
        # Options that do not change the computation may differ on resume.
        for key in ("progress", "run_dir", "data_dir", "device"):
            saved.pop(key, None), mine.pop(key, None)
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            raise ValueError(f"cannot resume: the checkpoint was made with other options "
                             f"(saved, now): {diff}")
        self.phase_index, self.epoch = state["phase_index"], state["epoch"]
        self.report = RunReport.from_dict(state["report"])
        self.selection = state["selection"]
        self._enter_phase(fresh=False)
        if self.selector is not None and state["selector"] is not None:
            self.selector.load_state_dict(state["selector"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    def save(self) -> None:
        path = os.path.join(self.config.run_dir, CHECKPOINT)
        torch.save(self.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash mid-write keeps the previous checkpoint

    # -- epochs ----------------------------------------------------------------

    def _loader(self, train: bool) -> DataLoader:
        if not train:
            return DataLoader(self.test_ds, batch_size=max(256, self.config.batch_size))
        # Batch order from (seed, phase, epoch) alone: a resumed run sees the same batches.
        g = torch.Generator().manual_seed(
            self.config.seed * 1_000_003 + self.phase_index * 10_007 + self.epoch)
        return DataLoader(self.train_ds, batch_size=self.config.batch_size, shuffle=True,
                          generator=g, drop_last=len(self.train_ds) > self.config.batch_size)

    def run_epoch(self) -> EpochRecord:
        from tqdm import tqdm

        c = self.config
        self.model.train()
        loader = self._loader(train=True)
        total_steps = c.epochs(self.phase) * len(loader)
        step0 = self.epoch * len(loader)
        exploring = self.phase == "explore"
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"{self.phase} {self.epoch + 1}/{c.epochs(self.phase)}",
                   disable=not c.progress, leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            lr = self._base_lr() * 0.5 * (1.0 + math.cos(math.pi * (step0 + i) / total_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if exploring:
                self.plan.apply(self.selector.select())
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} in {self.phase} epoch "
                                         f"{self.epoch + 1}, step {i}: lower the learning rate")
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if exploring:
                self.selector.update(self.plan.saliency())
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        train_time = time.perf_counter() - start
        if exploring:
            # Evaluate what phase 2 would keep now; the next step re-selects anyway.
            self.plan.apply(self.selector.best())
        test_acc = evaluate(self.model, self._loader(train=False), self.device)
        return EpochRecord(phase=self.phase, epoch=self.epoch + 1, train_loss=loss_sum / seen,
                           train_acc=correct / seen, test_acc=test_acc, train_seconds=train_time,
                           lr_end=lr)

    def advance(self) -> bool:
        """Runs one epoch (or a phase change); False once all phases are done."""
        if self.phase_index >= len(PHASES):
            return False
        if self.epoch >= self.config.epochs(self.phase):
            self.phase_index += 1
            self.epoch = 0
            if self.phase_index < len(PHASES):
                self._enter_phase(fresh=True)
            return True
        self.report.record_epoch(self.run_epoch())
        self.epoch += 1
        self.save()
        return True

    @property
    def done(self) -> bool:
        return self.phase_index >= len(PHASES)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device=None) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def _finish(run: _Run) -> RunReport:
    """Export, evaluation of the exported model, counts and the report file."""
    from ..flops import count_flops, count_params  # another module's job; imported on use

    c, report = run.config, run.report
    example = run.test_ds[0][0].unsqueeze(0).to(run.device)
    run.model.eval()
    compact = compact_model(run.model, run.plan).eval()
    paths = export_compact(compact, example.repeat(2, 1, 1, 1), c.run_dir, stem=EXPORT_STEM)
    test_loader = run._loader(train=False)
    sparse_acc = evaluate(run.model, test_loader, run.device)
    compact_acc = evaluate(compact, test_loader, run.device)
    dense_model = run._new_model().eval()  # the architecture at full width
    dense_phase = report.phases.get("dense", PhaseTotals())
    explore = report.phases["explore"]
    fine = report.phases.get("finetune")
    report.dense = DenseSummary(params=count_params(dense_model),
                                flops=count_flops(dense_model, example),
                                test_acc=dense_phase.test_acc,
                                seconds_per_epoch=dense_phase.seconds_per_epoch)
    report.compact = CompactSummary(
        params=count_params(compact), flops=count_flops(compact, example),
        test_acc=compact_acc, sparse_test_acc=sparse_acc,
        sparse_flops=count_flops(run.model, example),
        seconds_per_epoch=(fine or explore).seconds_per_epoch,
        explore_seconds_per_epoch=explore.seconds_per_epoch)
    report.reduction = Reduction(
        params=report.dense.params / max(report.compact.params, 1),
        flops=report.dense.flops / max(report.compact.flops, 1),
        accuracy_change=(None if report.dense.test_acc is None
                         else compact_acc - report.dense.test_acc))
    report.export = ExportInfo(**paths, accuracy_matches_sparse=abs(compact_acc - sparse_acc) < 1e-9)
    report.wall_clock_seconds = {p: v.seconds for p, v in report.phases.items()}
    report.save(os.path.join(c.run_dir, REPORT))
    return report


def train(config: TrainConfig, resume: bool = False, datasets: Optional[tuple] = None,
          stop_after_epochs: Optional[int] = None) -> Optional[RunReport]:
    """Runs (or with ``resume`` continues) a run; returns its report, or None if
    ``stop_after_epochs`` stopped it first (continue it with ``resume=True``).

    ``datasets``: ``(train, test)`` datasets of (image, label) to use instead of
    loading ``config.dataset``.
    """
    config.validate()
    ckpt = os.path.join(config.run_dir, CHECKPOINT)
    # Checked before the (slow) data loading.
    if resume and not os.path.exists(ckpt):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if not resume and os.path.exists(ckpt):
        raise FileExistsError(f"{config.run_dir} already holds a run; pass --resume to "
                              "continue it or choose another --run-dir")
    if datasets is None:
        train_ds, test_ds, info = load_data(config)
    else:
        train_ds, test_ds = (_limit(datasets[0], config.train_limit),
                             _limit(datasets[1], config.test_limit))
        info = _describe(train_ds)
    info = {k: info[k] for k in ("in_channels", "num_classes", "image_size")}
    os.makedirs(config.run_dir, exist_ok=True)
    run = _Run(config, train_ds, test_ds, info)
    if resume:
        run.load_state_dict(torch.load(ckpt, weights_only=False))
    with open(os.path.join(config.run_dir, CONFIG), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    epochs_run = 0
    while not run.done:
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            return None
        before = len(run.report.history)
        run.advance()
        epochs_run += len(run.report.history) - before
    return _finish(run)
