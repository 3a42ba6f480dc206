"""The learning-rate schedule of tokctl's training loops, from torch's own schedulers."""

from __future__ import annotations

import warnings

import torch
from torch.optim import lr_scheduler


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr: float = 0.0, start_step: int = 0) -> lr_scheduler.LRScheduler:
    """Linear warm-up to the optimizer's lr over ``warmup_steps`` (step s gets (s + 1) / warmup of
    it), then cosine decay to ``min_lr`` at ``total_steps``. Call ``step()`` after each optimizer
    step. ``start_step`` fast-forwards it when a run resumes from a checkpoint."""
    warmup = max(0, int(warmup_steps))
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps) - warmup),
                                            eta_min=float(min_lr))
    if warmup == 0:
        schedule = cosine
    else:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0,
                                     total_iters=max(1, warmup - 1))
        schedule = lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    with warnings.catch_warnings():  # stepping before the resumed optimizer's first step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(int(start_step)):
            schedule.step()
    return schedule
