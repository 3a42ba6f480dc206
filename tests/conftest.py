"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported, so that the kernels' Triton paths
run on the CPU (slowly: small shapes only).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def force_triton(monkeypatch):
    """Run the Triton path of a kernel even on CPU tensors (interpreter mode)."""
    monkeypatch.setenv("TOKCTL_TRITON", "1")
    yield
