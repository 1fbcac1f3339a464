"""Independent references for converted models.

The reference is the *original* model's graph and layers (plain ``nn.Conv2d``,
``nn.BatchNorm2d``, ``nn.Linear``), captured by ``torch.fx.symbolic_trace``
before conversion: it shares the parameter tensors (conversion shares them) but
none of dce_kernels' code. For a channel selection it masks, per layer, with
the index lists the sparse layers were given: each conv's inputs and outputs,
each BatchNorm's outputs. It also checks what makes skipping legal, without
trusting the channel analysis: every input channel a sparse conv skips, and
every Linear column it drops, must already be exactly zero in the masked
reference.
"""
from __future__ import annotations

import torch
from torch import nn


def capture_original(model: nn.Module) -> torch.fx.GraphModule:
    """The model's graph over its current (original) layers, shared, not copied."""
    return torch.fx.symbolic_trace(model)


def _mask(idx: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(size, dtype=like.dtype, device=like.device)
    m[idx.to(like.device)] = 1
    return m.view(1, -1, *([1] * (like.dim() - 2)))


class MaskedReference:
    """Hooks on the original layers that apply the sparse layers' channel lists."""

    def __init__(self, reference: torch.fx.GraphModule, converted: nn.Module,
                 linear_columns=()) -> None:
        self.reference = reference
        sparse = dict(converted.named_modules())
        self.handles = []
        self.violations: list[str] = []
        for name, layer in reference.named_modules():
            twin = sparse.get(name)
            if isinstance(layer, nn.Conv2d) and hasattr(twin, "out_idx"):
                self.handles.append(layer.register_forward_pre_hook(self._conv_in(name, twin)))
                self.handles.append(layer.register_forward_hook(self._conv_out(twin)))
            elif isinstance(layer, nn.BatchNorm2d) and hasattr(twin, "active_idx"):
                self.handles.append(layer.register_forward_hook(self._norm_out(twin)))
        names = {id(m): n for n, m in converted.named_modules()}
        for lin, cols in linear_columns:
            layer = reference.get_submodule(names[id(lin)])
            self.handles.append(layer.register_forward_pre_hook(self._linear_in(
                names[id(lin)], cols)))

    def _check_zero(self, name, x, keep, dim):
        drop = torch.ones(x.shape[dim], dtype=torch.bool)
        drop[keep.cpu()] = False
        if drop.any():
            skipped = x.detach().index_select(dim, drop.nonzero().squeeze(1).to(x.device))
            if skipped.abs().max() != 0:
                self.violations.append(name)

    def _conv_in(self, name, twin):
        def hook(module, args):
            x = args[0]
            self._check_zero(name, x, twin.in_idx, 1)
            return (x * _mask(twin.in_idx, x.shape[1], x),)
        return hook

    def _conv_out(self, twin):
        return lambda module, args, y: y * _mask(twin.out_idx, y.shape[1], y)

    def _norm_out(self, twin):
        return lambda module, args, y: y * _mask(twin.active_idx, y.shape[1], y)

    def _linear_in(self, name, cols):
        def hook(module, args):
            self._check_zero(name, args[0], cols, 1)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
