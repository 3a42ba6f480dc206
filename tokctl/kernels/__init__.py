"""Triton kernels for tokctl's hot paths, each beside its PyTorch reference.

One dispatch rule for all (:func:`use_triton`): the Triton kernel when the tensors are on a GPU and
Triton imports, the reference otherwise. ``TOKCTL_TRITON=1`` forces the kernel (tests do this on
the CPU with ``TRITON_INTERPRET=1``, set before triton is imported); ``TOKCTL_TRITON=0`` forbids it.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the reference
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    mode = os.environ.get("TOKCTL_TRITON", "auto")
    if mode == "0" or not triton_available():
        return False
    if mode == "1":
        return True
    return all(t.is_cuda for t in tensors)
