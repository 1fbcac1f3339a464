"""One training run of a method that produces a compact network, with checkpoints and a report.

Methods (``TrainConfig.method``, the table in :mod:`.choices`):

- ``cucb``, ``random``: Dynamic Channel Execution (:class:`~dce_kernels.DynamicChannels`).
  Phase ``explore``: each step the selector picks the active channels, the step trains
  only them (:class:`~dce_kernels.optim.MaskedOptimizer`), and the selector learns from
  the saliency the layers report. Then the selector keeps its best channels (CUCB: highest
  mean reward; random: random ones), and phase ``finetune`` trains only those.
- ``prune``: post-training pruning (Molchanov et al. 2017). Phase ``explore`` trains
  the dense network while the saliency of its last epoch is summed; the channels of
  highest L2-normalized sum are kept and fine-tuned. It costs dense training.
- ``narrow``: the compact architecture (the budget's per-layer channel counts, or for a
  global or flops budget those another run chose, ``widths_from``) built physically small and
  trained from scratch for the same total epochs (phase ``train``): Liu et al. 2019's
  baseline.

Every method may start with phase ``dense`` (the full architecture, same initialization,
for comparison). Each phase is a number of epochs; each epoch ends with a test
evaluation and a checkpoint, so ``resume=True`` continues a stopped run exactly as if it
had not stopped.

Learning rate: cosine decay to zero, computed from the step number (no scheduler state
to checkpoint). ``lr_schedule="restart"`` (the poster) decays within each phase, from
``lr`` and, when fine-tuning, from ``finetune_lr``; ``"continuous"`` runs one decay
from ``lr`` over exploration and fine-tuning together, as the narrow network's single
phase does.

Under torchrun each process runs this as one rank of a DistributedDataParallel job:
``batch_size`` is the global batch, split evenly among the ranks by a
``DistributedSampler``; the channel selection is kept identical on every rank
(:class:`~dce_kernels.DynamicChannels`); ``sync_bn`` normalizes by the statistics of the
global batch. Rank 0 writes the checkpoints, the report and the export; ``resume`` needs
the same number of processes.

Then the compact network is exported (:mod:`dce_kernels.compact`) and evaluated on its
own. ``report.json`` holds accuracies, parameter and FLOP counts of dense vs compact,
and the run's training cost: wall-clock seconds and training FLOPs (forward and
backward, counted by ``torch.utils.flop_counter`` on the first step of every epoch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.flop_counter import FlopCounterMode

from ..atomic import write_atomic
from ..channels import ChannelPlan, plan_for
from .. import distributed
from ..compact import compact_model, export_compact
from ..dynamic import DynamicChannels
from ..sync_batchnorm import convert_sync_batchnorm
from ..selectors import DEFAULT_TAU, REWARD_RULES, NonFiniteSaliencyError, _Selector
from .choices import (BUDGETS, DCE_METHODS, LR_SCHEDULES, METHODS, OPTIMIZERS, SELECTORS,
                      check_choice, phases_of)
from .files import CHECKPOINT, CONFIG, EXPORT_STEM, REPORT
from .models import build_model
from .models.init import reinitialize
from .report import (CompactSummary, DenseSummary, EpochRecord, ExportInfo, PhaseTotals,
                     Reduction, RunReport, Selection)

__all__ = ["TrainConfig", "NonFiniteError", "train", "narrow_model", "evaluate", "recalibrate_batchnorm"]

FLOP_SAMPLE_EVERY = 25  # training steps between two FLOP counts
# Exploration steps between two looks at the selector's non-finite-saliency flag (one
# read of the device each; the epoch's end looks too, before anything is saved).
SALIENCY_CHECK_EVERY = 25
RECALIBRATION_BATCHES = 20


class NonFiniteError(FloatingPointError):
    """A loss or saliency that is not finite stopped a run; the message says where."""


@dataclass
class TrainConfig:
    """Everything that defines a run (the CLI's options map onto these fields)."""

    model: str = "vgg11"
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    width: float = 1.0
    fraction: float = 0.5
    # The defaults are the variant that won the ablation (docs/ablation-fmnist); the
    # poster's algorithm is method="cucb", budget="layer", reward="max",
    # lr_schedule="restart", explore 2 : fine-tune 1.
    budget: str = "global"
    method: str = "shrink"
    tau: int = DEFAULT_TAU
    reward: str = "l2"
    discount: float = 1.0
    flops_weight: float = 0.0
    anneal: bool = False
    scale_init: bool = False
    rewind: bool = False
    widths_from: Optional[str] = None
    explore_epochs: int = 1
    finetune_epochs: int = 3
    dense_epochs: int = 0
    batch_size: int = 128  # the global batch: under torchrun, split among the ranks
    sync_bn: bool = False  # under torchrun: BatchNorm statistics of the global batch
    optimizer: str = "sgd"
    lr: float = 0.1
    finetune_lr: float = 0.02
    lr_schedule: str = "continuous"
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
        check_choice("method", self.method, METHODS)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("reward", self.reward, REWARD_RULES)
        check_choice("lr schedule", self.lr_schedule, LR_SCHEDULES)
        if self.explore_epochs < 1:
            raise ValueError("explore_epochs must be >= 1: the selector needs to see data")
        if self.finetune_epochs < 0 or self.dense_epochs < 0 or self.tau < 0:
            raise ValueError("epoch counts and tau must be non-negative")
        if self.batch_size < 1 or self.lr <= 0 or self.finetune_lr <= 0:
            raise ValueError("batch_size, lr and finetune_lr must be positive")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must lie in (0, 1], got {self.discount}")
        if not (math.isfinite(self.flops_weight) and self.flops_weight >= 0):
            raise ValueError(f"flops_weight must be a finite number >= 0, got "
                             f"{self.flops_weight}")
        if self.widths_from is not None and self.method != "narrow":
            raise ValueError("widths_from names the run whose channel counts a narrow "
                             f"network takes; it means nothing to method {self.method!r}")
        if (self.method == "narrow" and self.budget != "layer" and self.fraction < 1.0
                and self.widths_from is None):
            raise ValueError(f"a narrow network under a {self.budget} budget needs the channel "
                             "counts a selector chose: pass widths_from (a finished run)")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of samples")

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases this run goes through, in order."""
        phases = phases_of(self.method)
        return phases if self.dense_epochs > 0 else tuple(p for p in phases if p != "dense")

    def epochs(self, phase: str) -> int:
        return {"dense": self.dense_epochs, "explore": self.explore_epochs,
                "finetune": self.finetune_epochs,
                "train": self.explore_epochs + self.finetune_epochs}[phase]


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


def options_diff(saved: dict, now: dict, ignore=()) -> dict:
    """The options that differ between a saved configuration and this one, as
    ``{name: (saved, now)}``. Options that do not change the computation (``ignore``)
    may differ; an option the saved one lacks (made before the option existed) counts
    as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    keys = (set(saved) | set(now)) - set(ignore)
    return {k: (saved.get(k, defaults.get(k)), now.get(k, defaults.get(k))) for k in sorted(keys)
            if saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k))}


def full_model(config: TrainConfig, info: dict, device=None) -> nn.Module:
    """The architecture at full width, initialized from ``config.seed`` (the dense
    baseline and every sparse run start from these same weights)."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, info["in_channels"], info["num_classes"],
                        width=config.width, image_size=info.get("image_size"))
    return model.to(device) if device is not None else model


def budget_counts(config: TrainConfig, num_channels: list[int],
                  blocks: Optional[list[int]] = None) -> list[int]:
    """The per-layer channel counts of a narrow network: the layer budget's (always for
    ``narrow-uniform``), or the counts the run in ``widths_from`` kept."""
    if config.widths_from is None or config.method == "narrow-uniform":
        return _Selector(num_channels, config.fraction, "layer", blocks=blocks).active_counts()
    path = os.path.join(config.widths_from, REPORT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"widths_from: no finished run at {config.widths_from} "
                                f"(no {REPORT})")
    kept = RunReport.load(path).selection.channels_kept
    if len(kept) != len(num_channels) or any(not 1 <= k <= c for k, c in zip(kept, num_channels)):
        raise ValueError(f"widths_from: {config.widths_from} kept {kept} channels, which "
                         f"does not fit this model's layers {num_channels}")
    return list(kept)


def narrow_model(config: TrainConfig, info: dict, device=None) -> tuple[nn.Module, list[int],
                                                                        list[int]]:
    """The compact architecture as a plain model with a fresh initialization, and its
    per-layer channel counts next to the full ones.

    The architecture is what :func:`~dce_kernels.compact.compact_model` exports for a
    selection of those counts, so it equals a DCE run's compact model exactly; the
    weights are then initialized anew, as a model of that size would be."""
    full = full_model(config, info, device)
    plan = plan_for(full)
    counts = budget_counts(config, plan.num_channels, plan.blocks)
    plan.apply(plan.leading_channels(counts))
    small = compact_model(full, plan)
    torch.manual_seed(config.seed)
    reinitialize(small)
    return small, counts, plan.num_channels


def scale_for_active_width(model: nn.Module, fraction: float) -> None:
    """Scales every conv weight by ``1 / sqrt(fraction)``: He initialization of the
    layer as wide as its active part.

    Why: a layer followed by BatchNorm is scale-invariant, so its effective step size
    is ``lr / |w|^2``. Initialized for the full fan, the active block of a layer at
    fraction p has ``|w|^2`` p times that of the same-sized narrow layer, so every
    step moves it 1/p times further than the narrow network at the same learning rate
    (4x at p = 0.25, 10x at p = 0.1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1.0 / math.sqrt(fraction))


class _Run:
    """The state of one run and the code that moves it forward."""

    def __init__(self, config: TrainConfig, train_ds: Dataset, test_ds: Dataset,
                 info: dict) -> None:
        self.config = config
        self.train_ds, self.test_ds, self.info = train_ds, test_ds, info
        self.device = torch.device(config.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.net: Optional[nn.Module] = None  # what trains: the model, or DDP around it
        self.phases = config.phases
        self.phase_index = 0
        self.epoch = 0  # next epoch to run within the phase
        self.report = RunReport(config=dataclasses.asdict(config),
                                data={**info, "train_samples": len(train_ds),
                                      "test_samples": len(test_ds)},
                                world_size=self.world,
                                per_rank_batch=config.batch_size // self.world)
        self.selection: Optional[list[torch.Tensor]] = None
        # The channel selection of the sparse phases (None: dense or narrow).
        self.dce: Optional[DynamicChannels] = None
        self._enter_phase(fresh=True)

    @property
    def plan(self) -> Optional[ChannelPlan]:
        return None if self.dce is None else self.dce.plan

    @property
    def selector(self):
        return None if self.dce is None else self.dce.selector

    # -- construction ----------------------------------------------------------

    def _new_model(self, sparse: bool) -> nn.Module:
        """The initial weights; ``sparse``: of the channel-selecting phases."""
        model = full_model(self.config, self.info, self.device)
        if sparse and self.config.scale_init and self.config.method in DCE_METHODS:
            scale_for_active_width(model, self.config.fraction)
        return self._for_ranks(model)

    def _for_ranks(self, model: nn.Module) -> nn.Module:
        """The model as every rank trains it: with sync BatchNorms if asked (before a
        channel plan or DDP holds the layers)."""
        if self.world > 1 and self.config.sync_bn:
            convert_sync_batchnorm(model)
        return model

    def _wrap(self) -> None:
        """DDP around a newly built model (one process: the model itself)."""
        if self.net is not None and getattr(self.net, "module", self.net) is self.model:
            return
        if self.world == 1:
            self.net = self.model
            return
        # Inactive channels get zero gradients, not none: every parameter is used. With
        # sync BatchNorms the running statistics agree already: no buffer broadcast.
        # torch 2.14 renamed broadcast_buffers (same meaning for the forward broadcast).
        name = ("forward_sync_buffers" if "forward_sync_buffers"
                in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        self.net = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **{name: not self.config.sync_bn})

    def _new_dce(self) -> DynamicChannels:
        c = self.config
        # Under a FLOPs budget one image fixes every layer's spatial size, hence what a
        # channel costs.
        example = self.train_ds[0][0].unsqueeze(0).to(self.device) if c.budget == "flops" else None
        return DynamicChannels(self.model, budget=c.budget, example_input=example,
                               selector=lambda num_channels, **extra: SELECTORS[c.method](
                                   num_channels, c, self.steps_per_epoch, **extra))

    def _new_optimizer(self, lr: float):
        opt = OPTIMIZERS[self.config.optimizer](self.model.parameters(), lr, self.config)
        return opt if self.dce is None else self.dce.optimizer(opt)

    @property
    def steps_per_epoch(self) -> int:
        return len(self._loader(train=True))  # the loader's own rule for the last batch

    @property
    def phase(self) -> str:
        return self.phases[self.phase_index]

    def _lr(self, step: int) -> float:
        """The learning rate at ``step`` of the current phase."""
        c = self.config
        total = c.epochs(self.phase) * self.steps_per_epoch
        base = c.finetune_lr if self.phase == "finetune" else c.lr
        if c.lr_schedule == "continuous" and self.phase in ("explore", "finetune"):
            base = c.lr
            if self.phase == "finetune":
                step += c.explore_epochs * self.steps_per_epoch
            total = (c.explore_epochs + c.finetune_epochs) * self.steps_per_epoch
        if total == 0:  # a phase of no epochs never steps
            return base
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total))

    def _enter_phase(self, fresh: bool) -> None:
        """Builds what the current phase trains. ``fresh``: at a phase start
        (not when a checkpoint is about to overwrite the state)."""
        phase = self.phase
        if phase == "train":  # a narrow method
            self.model, counts, totals = narrow_model(self.config, self.info, self.device)
            self.model = self._for_ranks(self.model)
            self.dce = None
            self.report.selection = Selection.of([range(k) for k in counts], totals)
        elif phase != "finetune" or not fresh:
            # Fine-tuning continues the explored model, unless a checkpoint restores it.
            self.model = self._new_model(sparse=phase != "dense")
            # The dense phase trains every channel: no selection to make.
            self.dce = None if phase == "dense" else self._new_dce()
        if phase == "finetune":
            if fresh:
                # Keep the best channels (one selector call).
                # On the host: the selector's device may be a GPU, the checkpoint's is not.
                self.selection = [s.cpu() for s in self.dce.selector.best()]
                self.report.selection = Selection.of(self.selection, self.plan.num_channels)
                if self.config.rewind:
                    # The kept channels restart from their initial weights (as in the
                    # lottery-ticket experiments); only the choice of channels is kept.
                    self.model.load_state_dict(self._new_model(sparse=True).state_dict())
            self.dce.keep(self.selection)
        self._wrap()
        self.optimizer = self._new_optimizer(self._lr(0))

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "world_size": self.world,
            "phase_index": self.phase_index, "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "selection": self.selection,
            "report": self.report.to_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        diff = options_diff(state["config"], dataclasses.asdict(self.config),
                            ignore=("progress", "run_dir", "data_dir", "device"))
        if diff:
            raise ValueError(f"cannot resume: the checkpoint was made with other options "
                             f"(saved, now): {diff}")
        if state.get("world_size", 1) != self.world:
            # Another split of every batch: the run would not continue as it would have.
            raise ValueError(f"cannot resume: the checkpoint was made by "
                             f"{state.get('world_size', 1)} process(es), this run has "
                             f"{self.world}; resume with the same --nproc_per_node x --nnodes")
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
        if self.rank == 0:  # every rank holds the same state
            # A crash mid-write keeps the previous checkpoint.
            state = self.state_dict()
            write_atomic(os.path.join(self.config.run_dir, CHECKPOINT),
                         lambda f: torch.save(state, f), binary=True)
        if self.world > 1:
            dist.barrier()  # no rank reads the checkpoint (on resume) before it is written

    # -- epochs ----------------------------------------------------------------

    def _loader(self, train: bool) -> DataLoader:
        if not train:
            return DataLoader(self.test_ds, batch_size=max(256, self.config.batch_size))
        # Batch order from (seed, phase, epoch) alone: a resumed run sees the same batches.
        seed = self.config.seed * 1_000_003 + self.phase_index * 10_007 + self.epoch
        g = torch.Generator().manual_seed(seed)
        drop_last = len(self.train_ds) > self.config.batch_size
        if self.world == 1:
            return DataLoader(self.train_ds, batch_size=self.config.batch_size, shuffle=True,
                              generator=g, drop_last=drop_last)
        # Rank r takes every W-th index of one permutation: batch k of all ranks together
        # is positions [kB, (k+1)B) of it, and dropping each rank's remainder keeps the
        # number of global batches floor(n / B), as in one process.
        sampler = DistributedSampler(self.train_ds, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=seed, drop_last=True)
        return DataLoader(self.train_ds, batch_size=self.config.batch_size // self.world,
                          sampler=sampler, generator=g, drop_last=drop_last)

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: float,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step ``step`` of the epoch; returns the loss and the logits."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Exploring, the step selects channels and the selector learns from it (prune's
        # selector selects every channel); fine-tuning, the kept ones stay.
        try:
            with contextlib.nullcontext() if self.dce is None else self.dce.step(len(y)):
                out = self.net(x)
                loss = F.cross_entropy(out, y)
                if not torch.isfinite(loss):
                    self._stop(f"the loss is {loss.item()}", step, lr)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            if self.dce is not None and self.dce.exploring and \
                    (step + 1) % SALIENCY_CHECK_EVERY == 0:
                self._check_saliency()
        except NonFiniteSaliencyError as e:  # DynamicChannels' own look at the record
            self._stop_on_saliency(e)
        return loss, out

    def _check_saliency(self) -> None:
        """Stops the run if a saliency the selector saw was not finite. The selector
        left that step out of its statistics and recorded it on the device (reading it
        every step would wait for the device every step); this reads the record."""
        try:
            self.selector.check_saliency()
        except NonFiniteSaliencyError as e:
            self._stop_on_saliency(e)

    def _stop_on_saliency(self, e: NonFiniteSaliencyError) -> None:
        step, (layer, count) = e.step, e.layers[0]  # step: the selector's, from 1
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        self._stop(f"the saliency of channel group {layer} is not finite ({count} of "
                   f"{self.plan.num_channels[layer]} channels)", in_epoch,
                   self._lr(step - 1), epoch=epoch)

    def _stop(self, what: str, step: int, lr: float, epoch: Optional[int] = None) -> None:
        """Stops the run on a non-finite number, saying where (``epoch``: of the
        phase, default the current one) and what to try. The checkpoint on disk is
        the last finished epoch's: nothing is saved mid-epoch."""
        epoch = self.epoch if epoch is None else epoch
        c = self.config
        ckpt = os.path.join(c.run_dir, CHECKPOINT)
        option = "--finetune-lr" if self.phase == "finetune" and \
            c.lr_schedule == "restart" else "--lr"
        value = c.finetune_lr if option == "--finetune-lr" else c.lr
        kept = (f"the checkpoint of the last finished epoch ({ckpt}) is intact: --resume "
                "continues from it once the data is fixed" if os.path.exists(ckpt) else
                "no epoch had finished, so there is no checkpoint")
        raise NonFiniteError(
            f"{what} in phase {self.phase}, epoch {epoch + 1}/{c.epochs(self.phase)}, "
            f"step {step + 1}/{self.steps_per_epoch} (learning rate {lr:.3g}); the run "
            f"stopped. Training diverged or the data holds NaN or inf: try a lower "
            f"{option} (now {value:g}) in a new run, or check the input data; {kept}.")

    def run_epoch(self) -> EpochRecord:
        from tqdm import tqdm

        c = self.config
        self.model.train()
        loader = self._loader(train=True)
        step0 = self.epoch * len(loader)
        loss_sum, correct, seen, flop_samples = 0.0, 0, 0, []
        start = time.perf_counter()
        where = f"{self.phase} {self.epoch + 1}/{c.epochs(self.phase)}"
        # A bar redrawn in place only where someone watches it: in a file (CI, nohup, a
        # sweep worker's log) each redraw would be one more line. Rank 0 speaks for all.
        bar = tqdm(loader, desc=where,
                   disable=not (c.progress and _interactive()) or self.rank != 0,
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            lr = self._lr(step0 + i)
            if i % FLOP_SAMPLE_EVERY == 0:
                # Training FLOPs: counting every step would slow it down; the active
                # channel counts change smoothly (or not at all), so a regular sample
                # of steps stands for the others.
                with FlopCounterMode(display=False) as counter:
                    loss, out = self._step(x, y, lr, i)
                flop_samples.append(counter.get_total_flops())
            else:
                loss, out = self._step(x, y, lr, i)
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        train_time = time.perf_counter() - start
        if self.dce is not None and self.dce.exploring:
            self._check_saliency()  # before the selector's best() or a checkpoint
        flops_per_step = sum(flop_samples) / len(flop_samples) * self.world
        if self.world > 1:  # the epoch's loss and accuracy over the global batches
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0].item(), int(totals[1]), int(totals[2])
        if self.phase == "explore":
            # Evaluate what fine-tuning would keep now; the next step re-selects anyway.
            self.plan.apply(self.selector.best())
            recalibrate_batchnorm(self.model, loader, self.device)
        test_acc = evaluate(self.model, self._loader(train=False), self.device)
        if self.phase == "explore" and c.method == "prune":
            self.plan.apply(None)
        if c.progress and self.rank == 0:
            tqdm.write(f"{where}: loss {loss_sum / seen:.4f}, train acc {correct / seen:.4f}, "
                       f"test acc {test_acc:.4f}, {train_time:.1f} s", file=sys.stdout)
            sys.stdout.flush()
        return EpochRecord(phase=self.phase, epoch=self.epoch + 1, train_loss=loss_sum / seen,
                           train_acc=correct / seen, test_acc=test_acc, train_seconds=train_time,
                           lr_end=lr,
                           train_flops=round(flops_per_step * len(loader)))

    def advance(self) -> bool:
        """Runs one epoch (or a phase change); False once all phases are done."""
        if self.done:
            return False
        if self.epoch >= self.config.epochs(self.phase):
            self.phase_index += 1
            self.epoch = 0
            if not self.done:
                self._enter_phase(fresh=True)
            return True
        self.report.record_epoch(self.run_epoch())
        self.epoch += 1
        self.save()
        return True

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.phases)


def _interactive() -> bool:
    """Whether the progress bars' stream (stderr) is a terminal."""
    return sys.stderr.isatty()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, device=None,
                          batches: int = RECALIBRATION_BATCHES) -> None:
    """Recomputes every BatchNorm's running statistics for the channels now active, as
    the average over ``batches`` training batches.

    Why: running statistics gathered while other channels (or all of them) were active
    describe another network; a layer with a quarter of its inputs active sees about a
    quarter of the variance. Evaluating, or starting to fine-tune, with those stats
    measures the stale statistics instead of the network."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(device) if device is not None else x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


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
    # A narrow network is plain already; a sparse one exports its active channels.
    compact = run.model if run.plan is None else compact_model(run.model, run.plan).eval()
    paths = export_compact(compact, example.repeat(2, 1, 1, 1), c.run_dir, stem=EXPORT_STEM)
    test_loader = run._loader(train=False)
    sparse_acc = evaluate(run.model, test_loader, run.device)
    compact_acc = sparse_acc if run.plan is None else evaluate(compact, test_loader, run.device)
    compact_flops = count_flops(compact, example)
    dense_model = full_model(c, run.info, run.device).eval()
    dense_phase = report.phases.get("dense", PhaseTotals())
    # The phases that trained the compact network: the first after "dense" and the last
    # that ran (a phase of 0 epochs leaves no record).
    trained = [report.phases[p] for p in run.phases if p != "dense" and p in report.phases]
    first, last = trained[0], trained[-1]
    report.dense = DenseSummary(params=count_params(dense_model),
                                flops=count_flops(dense_model, example),
                                test_acc=dense_phase.test_acc,
                                seconds_per_epoch=dense_phase.seconds_per_epoch)
    report.compact = CompactSummary(
        params=count_params(compact), flops=compact_flops,
        test_acc=compact_acc, sparse_test_acc=sparse_acc,
        sparse_flops=compact_flops if run.plan is None else count_flops(run.model, example),
        seconds_per_epoch=last.seconds_per_epoch,
        explore_seconds_per_epoch=first.seconds_per_epoch)
    report.reduction = Reduction(
        params=report.dense.params / max(report.compact.params, 1),
        flops=report.dense.flops / max(report.compact.flops, 1),
        accuracy_change=(None if report.dense.test_acc is None
                         else compact_acc - report.dense.test_acc))
    report.export = ExportInfo(**paths,
                               accuracy_matches_sparse=abs(compact_acc - sparse_acc) < 1e-9)
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
    if config.batch_size % distributed.world_size():
        raise ValueError(f"batch_size {config.batch_size} (the global batch) does not split "
                         f"evenly among {distributed.world_size()} processes")
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
        try:
            state = torch.load(ckpt, weights_only=False)
        except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
            raise ValueError(f"cannot resume: {ckpt} is not a readable checkpoint "
                             f"({type(e).__name__}: {e}); start a new run instead") from e
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError(f"cannot resume: {ckpt} is not a checkpoint of dce train")
        run.load_state_dict(state)
    if run.rank == 0:
        write_atomic(os.path.join(config.run_dir, CONFIG),
                     lambda f: json.dump(dataclasses.asdict(config), f, indent=2))
    epochs_run = 0
    while not run.done:
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            return None
        before = len(run.report.history)
        run.advance()
        epochs_run += len(run.report.history) - before
    if run.world == 1:
        return _finish(run)
    # Rank 0 exports and evaluates (eval mode: no collectives); every rank returns its report.
    shared = [_finish(run).to_dict() if run.rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return RunReport.from_dict(shared[0])
