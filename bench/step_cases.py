"""The whole-step candidates: one training step of VGG-16-BN (forward, backward,
optimizer step; for ours also channel selection and the selector's update),
batch 64, 32x32 input, done three ways."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dce_kernels.channels import plan_for
from dce_kernels.compact import compact_model
from dce_kernels.experiments.models import build_model
from dce_kernels.optim import MaskedOptimizer
from dce_kernels.selectors import CUCBSelector

BATCH = 64
IMAGE = 32
CLASSES = 10
MODEL = "vgg16"


def _plain(width: float, seed: int):
    """VGG-16-BN of plain nn.Conv2d / nn.BatchNorm2d layers at ``width``."""
    torch.manual_seed(seed)
    sparse = build_model(MODEL, 3, CLASSES, width=width)
    plan = plan_for(sparse)
    plan.apply(None)
    return compact_model(sparse, plan)


def _sgd(params, lr=0.01):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def make_step_cases(fraction: float, batch: int = BATCH, saliency: bool = True, seed: int = 0,
                    tau: int = 2, only: str | None = None, device: str = "cpu",
                    in_place: bool = True):
    """Callables for one training step: ``dense`` (plain full-width model),
    ``narrow`` (plain model physically narrowed to the active width) and
    ``ours`` (channel-sparse model, CUCB selection at ``fraction``, masked SGD).

    The selector's warm-up ``tau`` is short so that the timed steps run the
    UCB path, which is the steady state of a real run. ``only`` builds just
    that candidate (for measuring its memory alone). Models and data live on
    ``device``. ``in_place=False``: the masked SGD gathers and scatters its
    blocks (MaskedOptimizer's generic path)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)

    def plain_step(model):
        opt = _sgd(model.parameters())

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    def ours_step():
        torch.manual_seed(seed)
        sparse = build_model(MODEL, 3, CLASSES, width=1.0).to(device)
        for m in sparse.modules():
            if hasattr(m, "track_saliency"):
                m.track_saliency = saliency
        plan = plan_for(sparse)
        selector = CUCBSelector(plan.num_channels, fraction, tau=tau, seed=seed)
        opt = MaskedOptimizer(_sgd(sparse.parameters()), plan.active_blocks, in_place=in_place)

        def step():
            plan.apply(selector.select())
            opt.zero_grad()
            F.cross_entropy(sparse(x), y).backward()
            opt.step()
            selector.update(plan.saliency())
        return step

    builders = {"dense": lambda: plain_step(_plain(1.0, seed).to(device)),
                "narrow": lambda: plain_step(_plain(fraction, seed).to(device)),
                "ours": ours_step}
    return {name: build() for name, build in builders.items() if only in (None, name)}
