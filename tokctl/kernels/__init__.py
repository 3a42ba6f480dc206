"""Triton kernels for tokctl's hot paths, each beside its PyTorch reference.

One dispatch rule for all (:func:`use_triton`): the Triton kernel when the tensors are on a GPU and
Triton imports, the reference otherwise. ``TOKCTL_TRITON=1`` forces the kernel (tests do this on
the CPU with ``TRITON_INTERPRET=1``, set before triton is imported); ``TOKCTL_TRITON=0`` forbids it.

Every dispatch is counted (:func:`path_taken`), so a command can write which path its kernels took
to metrics.json (``kernel``), and a test can check that the Triton path really ran. Tensors on a
GPU served by the slow reference because Triton does not import get a warning line.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import torch

_taken: Counter = Counter()  # "triton" / "reference": dispatches that took each path
_warned: set[str] = set()


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """Why Triton cannot be used here (None when it imports)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: use the reference
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def triton_available() -> bool:
    return triton_import_error() is None


def use_triton(*tensors: torch.Tensor) -> bool:
    mode = os.environ.get("TOKCTL_TRITON", "auto")
    on_gpu = bool(tensors) and all(t.is_cuda for t in tensors)
    if mode == "0":
        choice = False
    elif not triton_available():
        choice = False
        if on_gpu or mode == "1":
            _warn_once(f"Triton does not import ({triton_import_error()}): the kernels run their "
                       f"slow PyTorch references (metrics.json: kernel: reference)")
    else:
        choice = mode == "1" or on_gpu
    _taken["triton" if choice else "reference"] += 1
    return choice


def path_taken() -> str | None:
    """Which path the dispatches since :func:`reset_counts` took: "triton", "reference", both
    ("triton+reference"), or None when no kernel was called."""
    paths = [p for p in ("triton", "reference") if _taken[p]]
    return "+".join(paths) or None


def counts() -> dict[str, int]:
    return dict(_taken)


def reset_counts() -> None:
    _taken.clear()


def _warn_once(message: str) -> None:
    if message in _warned:
        return
    _warned.add(message)
    from tokctl.console import console

    console.print(f"[yellow]warning[/]: {message}", soft_wrap=True)
