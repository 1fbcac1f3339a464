"""In-place optimizer steps of active blocks: torch.optim's SGD, Adam and AdamW
computed on the active block of a parameter where it lies, in one pass, with
no compact copies (the ``dce::sgd_block_step_`` / ``dce::adam_block_step_``
kernels in csrc/cpu/block_steps.cpp).

Which path a block takes (:func:`block_step_for`, :func:`supports`):

- in place: CPU float32/float64 parameters of a ``torch.optim.SGD``, ``Adam``
  or ``AdamW`` (exactly those classes, not subclasses) whose group uses the
  single-tensor step (``foreach`` and ``fused`` off or unset,
  ``differentiable`` and ``capturable`` off) with float hyperparameters;
  amsgrad, nesterov, dampening, maximize and weight decay included;
- every other optimizer, device, dtype or setting: the generic
  gather-step-scatter of :class:`dce_kernels.optim.MaskedOptimizer`.

The kernels repeat the inner optimizer's arithmetic rounding for rounding, so
an in-place step is bit-identical to the optimizer's own step on a gathered
copy (python_tests/test_block_steps.py). The per-tensor scalars (Adam's step
count and bias corrections) are computed here, as torch.optim computes them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim.optimizer import _get_scalar_dtype

__all__ = ["BlockStep", "block_step_for", "supports"]

# (group, state, block): steps ``block`` (a dce_kernels.optim.ActiveBlock:
# param, rows, cols, view) of its parameter in place, with the parameter's
# gradient, creating the state the optimizer would create.
BlockStep = Callable[[dict, dict, object], None]


def _viewed(block, full: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return full if full is None or block.view is None else full.view(block.view)


def _sgd_step(group, state, block) -> None:
    param = block.param.data
    momentum = group["momentum"]
    buf, fresh = None, False
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            # torch.optim sets the buffer to the gradient on its first step; the
            # inactive part starts at zero, as if those channels had not been seen.
            buf, fresh = torch.zeros_like(param), True
            state["momentum_buffer"] = buf
    torch.ops.dce.sgd_block_step_(_viewed(block, param), _viewed(block, block.param.grad),
                                  _viewed(block, buf), block.rows, block.cols, group["lr"],
                                  momentum, group["dampening"], group["weight_decay"],
                                  group["nesterov"], group["maximize"], fresh)


def _adam_step(group, state, block) -> None:
    param = block.param.data
    if len(state) == 0:  # Adam._init_group's lazy initialization
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    # _single_tensor_adam's per-tensor scalars, in its order of operations.
    step_t = state["step"]
    step_t += 1
    step = step_t.item()
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    torch.ops.dce.adam_block_step_(
        _viewed(block, param), _viewed(block, block.param.grad),
        _viewed(block, state["exp_avg"]), _viewed(block, state["exp_avg_sq"]),
        _viewed(block, state["max_exp_avg_sq"] if group["amsgrad"] else None),
        block.rows, block.cols, lr, beta1, beta2,
        group["weight_decay"], group.get("decoupled_weight_decay", False), group["eps"],
        step_size, bias_correction2_sqrt, group["maximize"])


def block_step_for(optimizer: torch.optim.Optimizer) -> Optional[BlockStep]:
    """The in-place step for ``optimizer``'s class, or None (generic path)."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return _sgd_step
    if kind is torch.optim.Adam or kind is torch.optim.AdamW:
        return _adam_step
    return None


def _is_float(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def supports(group: dict, state: dict, param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the in-place step computes exactly what ``group``'s own step
    would for this parameter (its data) and gradient, with this state."""
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.float64):
        return False
    if grad.dtype != param.dtype or grad.layout != torch.strided or grad.is_sparse:
        return False
    if not (param.is_contiguous() and grad.is_contiguous()):
        return False
    if group.get("foreach") or group.get("fused") or group.get("differentiable") \
            or group.get("capturable"):
        return False
    scalars = [group.get(k, 0) for k in ("lr", "momentum", "dampening", "weight_decay", "eps")]
    scalars += list(group.get("betas", ()))
    if not all(_is_float(x) for x in scalars):
        return False
    # Existing state must be the plain contiguous tensors the kernels update.
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        value = state.get(key)
        if value is not None and not (torch.is_tensor(value) and value.dtype == param.dtype
                                      and value.is_contiguous()
                                      and value.shape == param.shape):
            return False
    step = state.get("step")
    if step is not None and not (torch.is_tensor(step) and step.device.type == "cpu"):
        return False
    if "exp_avg" in state and group.get("amsgrad") and "max_exp_avg_sq" not in state:
        return False
    return True
