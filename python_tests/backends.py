"""The backends the correctness suite runs against.

Each backend is the functional API of one implementation of the dce schemas
plus the device its tensors live on. Every test that takes the `backend`
fixture runs once per backend present on this machine.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable

import torch

import dce_kernels


@dataclass(frozen=True)
class Backend:
    name: str
    conv: Callable  # same signature as dce_kernels.channel_sparse_conv2d
    device: str
    namespace: str  # its ops are torch.ops.<namespace>.*, for tests that call them directly

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def __str__(self) -> str:
        return self.name


def available_backends() -> list[Backend]:
    found = [Backend("cpu", dce_kernels.channel_sparse_conv2d, "cpu", "dce")]
    # The emulator exists wherever its fiber switch does (x86-64); there, a
    # missing or broken build must fail the suite, not skip it silently.
    if platform.machine().lower() in {"x86_64", "amd64"}:
        from dce_kernels import emulated

        found.append(Backend("emulated", emulated.channel_sparse_conv2d, "cpu", "dce_emu"))
    if torch.cuda.is_available():
        found.append(Backend("cuda", dce_kernels.channel_sparse_conv2d, "cuda", "dce"))
    return found


BACKENDS = available_backends()
