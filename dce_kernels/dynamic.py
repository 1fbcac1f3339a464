"""One object for a training loop of your own: :class:`DynamicChannels`.

It joins the pieces a loop would otherwise wire by hand (the channel plan, the
selector, the masked optimizer, the export), and under ``torch.distributed`` it
keeps the channel selection identical on every rank:

- the selection: every rank's selector has the same seed and, after the saliency
  all-reduce below, the same inputs, so every rank selects the same channels
  without sending them; a digest of the selector's state is compared across the
  ranks at the first step, every ``check_every`` steps and when exploration ends,
  and a difference raises on every rank;
- the saliency: each rank's is reduced to that of the global batch
  (:func:`dce_kernels.distributed.global_saliency`) before ``selector.update``;
- gradients are DistributedDataParallel's job: wrap the model in DDP as usual. The
  sparse ops give inactive channels exact zero gradients (not missing ones), so
  every parameter takes part in every step and ``find_unused_parameters`` is not
  needed.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import distributed
from .channels import ChannelPlan, plan_for
from .compact import compact_model, export_compact, export_paths
from .cost import FlopsCost
from .optim import MaskedOptimizer
from .selectors import (CUCBSelector, RandomSelector, ShrinkSelector, TaylorPruneSelector,
                        _Selector)
from .sync_batchnorm import convert_sync_batchnorm

__all__ = ["DynamicChannels", "SELECTOR_NAMES"]

# selector= by name. ShrinkSelector's horizon and CUCBSelector's optional one come
# from ``steps``.
SELECTOR_NAMES = {
    "shrink": ShrinkSelector,
    "cucb": CUCBSelector,
    "random": RandomSelector,
    "taylor": TaylorPruneSelector,
}
DEFAULT_CHECK_EVERY = 100  # steps between two cross-rank checks of the selector state


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class DynamicChannels:
    """Dynamic channel execution for ``model`` in your own training loop.

    ``selector``: a name (``"shrink"``, ``"cucb"``, ``"random"``, ``"taylor"``, built
    with ``fraction``, ``budget``, ``seed`` and ``**options``), a selector object (the
    protocol of :mod:`dce_kernels.selectors`), or a callable taking the groups'
    channel counts and returning one. ``steps``: the number of exploration steps
    (``"shrink"`` needs it: its active set reaches the budget at that step; for
    ``"cucb"`` it sets the annealing horizon if ``anneal=True`` is passed). ``sync_bn``:
    replace the BatchNorms by :class:`~dce_kernels.ChannelSparseSyncBatchNorm2d`
    (before the plan is built, so do it before wrapping the model in DDP).
    ``budget="flops"`` needs ``example_input`` (one batch; its spatial size fixes what a
    channel costs): the fitted :class:`~dce_kernels.FlopsCost` is ``dce.cost``, and a
    factory ``selector`` is called with ``cost=`` as well. A model with grouped convs
    (RegNet, ResNeXt) has channel groups with blocks (``dce.plan.blocks``): a factory
    is called with ``blocks=`` too, and a selector object must have been built with
    them.

    The loop::

        dce = DynamicChannels(model, fraction=0.5, selector="shrink", steps=1000)
        opt = dce.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        for x, y in loader:                  # exploration
            with dce.step():                 # selects and applies the channels;
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
            # ... and on leaving, the selector learned from the saliency
        dce.keep()                           # the best channels, fixed from now on
        ...                                  # fine-tune: the same loop
        dce.export(x, "out")                 # the plain, smaller model
    """

    def __init__(self, model: nn.Module, fraction: float = 0.5,
                 selector: Union[str, object, Callable] = "shrink", *,
                 steps: Optional[int] = None, budget: str = "global", seed: int = 0,
                 pack: bool = True, sync_bn: bool = False,
                 check_every: int = DEFAULT_CHECK_EVERY, process_group=None,
                 example_input: Optional[torch.Tensor] = None, **options) -> None:
        if int(check_every) != check_every or check_every < 1:
            raise ValueError(f"check_every must be a positive number of steps, got {check_every}")
        self.model = _unwrap(model)
        if sync_bn:
            convert_sync_batchnorm(self.model, process_group)
        self.plan: ChannelPlan = plan_for(self.model, pack=pack)
        self.cost: Optional[FlopsCost] = None
        if budget == "flops":
            if example_input is None:
                raise ValueError("budget='flops' needs example_input= (one input batch, e.g. "
                                 "one image): it fixes what each channel costs")
            self.cost = FlopsCost.fit(self.model, self.plan, example_input)
        self.selector = self._build_selector(selector, fraction, steps, budget, seed, options)
        # Our selectors work where the saliency is, and their selections need no checks
        # (which would read them back to the host every step).
        self._own_selector = isinstance(self.selector, _Selector)
        if self._own_selector:
            self.selector.to(self.plan.groups[0].producer.weight.device)
        self.check_every = int(check_every)
        self.process_group = process_group
        self.exploring = True
        self.steps = 0  # exploration steps taken

    def _build_selector(self, selector, fraction, steps, budget, seed, options):
        num_channels = self.plan.num_channels
        blocks = self.plan.blocks
        # What a factory is given besides the channel counts: only what this model needs,
        # so that factories written before costs and blocks existed keep working.
        extra = {}
        if self.cost is not None:
            extra["cost"] = self.cost
        if any(b > 1 for b in blocks):
            extra["blocks"] = blocks
        if isinstance(selector, str):
            if selector not in SELECTOR_NAMES:
                raise ValueError(f"unknown selector {selector!r}; choose from "
                                 f"{', '.join(SELECTOR_NAMES)}, or pass a selector object")
            if steps is not None and (int(steps) != steps or steps < 1):
                raise ValueError(f"steps must be a positive number of steps, got {steps}")
            kwargs = dict(fraction=fraction, budget=budget, seed=seed, **extra, **options)
            if selector == "shrink":
                if steps is None:
                    raise ValueError("selector 'shrink' needs steps=: the number of "
                                     "exploration steps over which the channels shrink")
                kwargs["horizon"] = steps
            elif selector == "cucb" and kwargs.pop("anneal", False):
                if steps is None:
                    raise ValueError("cucb with anneal=True needs steps=: its horizon")
                kwargs["horizon"] = steps
            return SELECTOR_NAMES[selector](num_channels, **kwargs)
        if options:
            raise ValueError(f"options {sorted(options)} apply only to a selector given by "
                             "name")
        if all(hasattr(selector, m) for m in ("select", "update", "best")):
            chosen = selector
        elif callable(selector):
            chosen = selector(num_channels, **extra)
        else:
            raise TypeError(f"selector must be a name, a selector or a factory, got "
                            f"{type(selector).__name__}")
        if list(getattr(chosen, "num_channels", num_channels)) != list(num_channels):
            raise ValueError(f"the selector was built for channel counts "
                             f"{list(chosen.num_channels)}, the model's groups have "
                             f"{list(num_channels)}")
        if list(getattr(chosen, "blocks", [1] * len(blocks))) != blocks:
            raise ValueError(f"the model's channel groups need blocks {blocks} (grouped convs "
                             "read them: a selection must take equally many channels of every "
                             "conv group); build the selector with blocks=plan.blocks")
        return chosen

    # -- the training step -------------------------------------------------------

    def optimizer(self, optimizer: torch.optim.Optimizer) -> MaskedOptimizer:
        """``optimizer`` stepping only the active channels' weights and state (a
        ``torch.optim.Optimizer``, so ``torch.optim.lr_scheduler`` accepts it)."""
        return MaskedOptimizer(optimizer, self.plan.active_blocks)

    @contextlib.contextmanager
    def step(self, batch_size: Optional[int] = None) -> Iterator[None]:
        """One training step: the forward, backward and optimizer step go inside.

        While exploring, entering applies the selector's next selection, and leaving
        feeds it the step's saliency (of the global batch, under torch.distributed).
        Every ``check_every`` steps (and at the first) the selector says whether a
        saliency was not finite (ValueError), and the ranks are compared.
        ``batch_size``: this rank's batch, to weight the saliency by when ranks' batches
        differ (None: equal). After :meth:`keep` it does nothing. If the body raises,
        the selector learns nothing from the step."""
        if not self.exploring:
            yield
            return
        self.plan.apply(self.selector.select(), validate=not self._own_selector)
        yield
        self.selector.update(distributed.global_saliency(self.plan.saliency(), batch_size,
                                                         self.process_group))
        self.steps += 1
        if self.steps == 1 or self.steps % self.check_every == 0:
            if hasattr(self.selector, "check_saliency"):
                self.selector.check_saliency()
            self.check_ranks_agree()

    def keep(self, selection: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """Ends exploration: applies ``selection`` (default: the selector's best
        channels) and keeps it for every later step. Returns the selection."""
        if selection is None:
            selection = self.selector.best()
        self.plan.apply(selection)
        self.exploring = False
        self.check_ranks_agree()
        return self.plan.selection

    def check_ranks_agree(self) -> None:
        """Raises RuntimeError on every rank if the selector state or the applied
        selection differ between ranks (a no-op in a single process)."""
        if distributed.world_size(self.process_group) == 1:
            return
        state = {"selector": self.selector.state_dict() if hasattr(self.selector, "state_dict")
                 else None, "selection": self.plan.selection, "exploring": self.exploring}
        device = self.plan.groups[0].producer.weight.device
        distributed.check_same_on_all_ranks(
            distributed.digest(state), f"the channel selector's state after {self.steps} "
            "exploration step(s)", device=device, group=self.process_group)

    @property
    def selection(self) -> Optional[list[torch.Tensor]]:
        """The applied channels of each group (None: all)."""
        return self.plan.selection

    # -- the result --------------------------------------------------------------

    def compact(self) -> nn.Module:
        """A copy of the model with only the active channels, of plain torch layers
        (:func:`~dce_kernels.compact_model`), in eval mode."""
        return compact_model(self.model, self.plan).eval()

    def export(self, example_input: torch.Tensor, directory: str,
               stem: str = "compact") -> dict[str, str]:
        """Writes the compact model (:func:`~dce_kernels.export_compact`) and returns
        the paths. Under torch.distributed only rank 0 writes (call it on every rank
        or on rank 0 alone); every rank gets the paths."""
        if distributed.rank(self.process_group) != 0:
            return export_paths(directory, stem)
        return export_compact(self.compact(), example_input, directory, stem=stem)

    # -- resume ------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The selector, the applied selection and the phase: with the model's and the
        optimizer's state dicts, all a loop needs to resume exactly."""
        return {"selector": self.selector.state_dict(), "selection": self.plan.selection,
                "exploring": self.exploring, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        missing = {"selector", "selection", "exploring", "steps"} - set(state)
        if missing:
            raise ValueError(f"not a DynamicChannels state: it lacks {sorted(missing)}")
        self.selector.load_state_dict(state["selector"])
        self.plan.apply(state["selection"])
        self.exploring = bool(state["exploring"])
        self.steps = int(state["steps"])
        self.check_ranks_agree()
