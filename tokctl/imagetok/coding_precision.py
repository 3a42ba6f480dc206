"""What the encoder and the decoder of a coded token file must compute alike.

Arithmetic coding needs both sides to use the same probabilities bit for bit. Each prior runs the
same loop on both sides, in float64 (:func:`float64_copy`), and rounds its logits to multiples of
1/LOGIT_GRID before the softmax (:func:`coding_softmax`): across machines float kernels differ in
their last bits, and a difference of ~1e-14 then changes a probability only when a logit lies
within that distance of a rounding edge.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

LOGIT_GRID = 64.0  # logits are rounded to multiples of 1/LOGIT_GRID before coding


def float64_copy(prior: nn.Module) -> nn.Module:
    """The prior itself when it is float64, else a float64 copy of it, made once (priors that
    code are loaded ones, whose weights do not change)."""
    if next(prior.parameters()).dtype == torch.float64:
        return prior
    if "_float64" not in prior.__dict__:  # kept out of the module's registered children
        prior.__dict__["_float64"] = copy.deepcopy(prior).double().eval()
    return prior.__dict__["_float64"]


def coding_start(prior: nn.Module, tokens, n: int, decode_step) -> tuple[nn.Module, int]:
    """What a prior's ``coding_probabilities`` starts with: ``n`` checked against the tokens it
    models, its float64 copy, and the batch (the tiles given, or the decoder's batch)."""
    if n > prior.max_tokens:
        raise ValueError(f"{n} tokens; this prior models at most {prior.max_tokens}")
    return float64_copy(prior), tokens.shape[0] if tokens is not None else decode_step.batch


def coding_softmax(logits: torch.Tensor) -> np.ndarray:
    """The coder's probabilities of float64 logits: rounded to the grid, then the softmax."""
    return torch.softmax(torch.round(logits * LOGIT_GRID) / LOGIT_GRID, -1).numpy()
