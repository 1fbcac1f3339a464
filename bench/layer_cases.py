"""The layer-level candidates compared in the benchmarks: one forward+backward
step of a 3x3 conv at VGG-16 shapes, done four ways."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dce_kernels

# (channels, spatial size) of VGG-16's conv stages on 32x32 input.
VGG16_SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]
BATCH = 64


def active_count(channels: int, fraction: float) -> int:
    return max(1, round(channels * fraction))


def random_sorted_index(channels: int, fraction: float, generator: torch.Generator):
    k = active_count(channels, fraction)
    return torch.randperm(channels, generator=generator)[:k].sort().values


def make_cases(channels: int, size: int, fraction: float, batch: int = BATCH,
               saliency: bool = True, seed: int = 0):
    """Callables for one fwd+bwd step: dense nn.Conv2d at full width, a
    physically narrower dense conv at the active width, the naive
    index_select + conv + index_copy, ours at full width, and ours with packed
    input and output (a layer inside a chain of packed sparse layers: it reads
    and writes the same narrow tensors as the narrow conv)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    w = torch.randn(channels, channels, 3, 3, generator=g) * 0.05
    b = torch.randn(channels, generator=g)
    in_idx = random_sorted_index(channels, fraction, g)
    out_idx = random_sorted_index(channels, fraction, g)
    k_in, k_out = in_idx.numel(), out_idx.numel()
    x_narrow = torch.randn(batch, k_in, size, size, generator=g)
    w_narrow = torch.randn(k_out, k_in, 3, 3, generator=g) * 0.05
    b_narrow = torch.randn(k_out, generator=g)
    grad_full = torch.randn(batch, channels, size, size, generator=g)
    grad_narrow = torch.randn(batch, k_out, size, size, generator=g)

    leaves = {}

    def leaf(name, t):
        leaves[name] = t.detach().clone().requires_grad_()
        return leaves[name]

    xd, wd, bd = leaf("xd", x), leaf("wd", w), leaf("bd", b)
    xn, wn, bn = leaf("xn", x_narrow), leaf("wn", w_narrow), leaf("bn", b_narrow)
    xo, wo, bo = leaf("xo", x), leaf("wo", w), leaf("bo", b)
    xg, wg, bg = leaf("xg", x), leaf("wg", w), leaf("bg", b)
    xp, wp, bp = leaf("xp", x_narrow), leaf("wp", w), leaf("bp", b)
    probe = torch.zeros(channels, requires_grad=True) if saliency else None

    def clear():
        for t in leaves.values():
            t.grad = None
        if probe is not None:
            probe.grad = None

    def dense():
        clear()
        F.conv2d(xd, wd, bd, 1, 1).backward(grad_full)

    def narrow():
        clear()
        F.conv2d(xn, wn, bn, 1, 1).backward(grad_narrow)

    def ours():
        clear()
        dce_kernels.channel_sparse_conv2d(xo, wo, bo, in_idx, out_idx, 1, 1,
                                          saliency_probe=probe).backward(grad_full)

    def ours_packed():
        clear()
        dce_kernels.channel_sparse_conv2d(xp, wp, bp, in_idx, out_idx, 1, 1,
                                          saliency_probe=probe, packed_input=True,
                                          packed_output=True).backward(grad_narrow)

    def naive():
        clear()
        xs = xg.index_select(1, in_idx)
        ws = wg.index_select(0, out_idx).index_select(1, in_idx)
        y = F.conv2d(xs, ws, bg.index_select(0, out_idx), 1, 1)
        full = torch.zeros(batch, channels, size, size).index_copy(1, out_idx, y)
        full.backward(grad_full)

    return {"dense": dense, "narrow": narrow, "ours": ours, "ours_packed": ours_packed,
            "naive": naive}
