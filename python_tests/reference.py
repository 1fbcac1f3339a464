"""Independent reference for the op contract: PyTorch's own F.conv2d on masked
tensors, in float64, with saliency taken from autograd hooks. Shares no code
with dce_kernels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def channel_mask(idx: torch.Tensor, num_channels: int, dtype=torch.float64) -> torch.Tensor:
    mask = torch.zeros(num_channels, dtype=dtype)
    mask[idx.long().cpu()] = 1
    return mask


@dataclass
class ReferenceResult:
    output: torch.Tensor
    grad_input: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor | None
    saliency: torch.Tensor


def masked_dense(input, weight, bias, in_idx, out_idx, grad_output, stride=1, padding=0,
                 dilation=1, groups=1) -> ReferenceResult:
    """F.conv2d(input * mask_in, weight, bias) * mask_out in float64, its gradients
    for grad_output, and the saliency mean_n |mean_hw(dL/dh * h)| of the conv output h."""
    x = input.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()
    b = bias.detach().double().cpu().requires_grad_() if bias is not None else None
    m_in = channel_mask(in_idx, x.shape[1]).view(1, -1, 1, 1)
    m_out = channel_mask(out_idx, w.shape[0]).view(1, -1, 1, 1)

    captured = {}
    h = F.conv2d(x * m_in, w, b, stride, padding, dilation, groups)
    h.register_hook(lambda g: captured.__setitem__("g", g))
    y = h * m_out
    y.backward(grad_output.detach().double().cpu())

    g = captured["g"]
    saliency = (g * h.detach()).mean(dim=(2, 3)).abs().mean(dim=0) * m_out.view(-1)
    return ReferenceResult(
        output=y.detach(), grad_input=x.grad, grad_weight=w.grad,
        grad_bias=b.grad if b is not None else None, saliency=saliency)


def random_index(num_channels: int, fraction: float, generator=None) -> torch.Tensor:
    """A random subset of channels (at least one), in random order."""
    k = max(1, round(num_channels * fraction))
    return torch.randperm(num_channels, generator=generator)[:k]
