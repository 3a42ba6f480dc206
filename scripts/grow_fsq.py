"""Grow a trained FSQ tokenizer into one with more FSQ dimensions, or with a finer grid on the
same dimensions, drawing the same images.

`tokctl tokenize-image train init=` loads weights strictly, so it refuses a tokenizer whose
quantiser has another number of dimensions. This makes the starting point for such a run: every
weight of the trained tokenizer is kept; the encoder's code projection (`to_code`) gains an
output row per new dimension (freshly initialised), and the decoder's (`from_code`) gains an
input column per new dimension set to zero, so the grown tokenizer decodes exactly as the old
one until training teaches the new dimensions something. Used for the shipped 24-bit 2D
tokenizer (tokctl/imagetok/weights/README.md):

    python scripts/grow_fsq.py vq2d 8,8,8,8,8,8,8,8 runs/imagetok/vq2d-fsq8x8-init.pt

Given as many dimensions, each with at least as many levels, every weight is kept as it is and
only the grid gets finer: the 32-bit vq2d32 is vq2d24 read on 16 levels a dimension, whose
values include all of the 8-level grid's (its digits are coded under a DigitPrior):

    python scripts/grow_fsq.py vq2d24 16,16,16,16,16,16,16,16 tokctl/imagetok/weights/vq2d32.pt
"""

from __future__ import annotations

import copy
import sys

import torch

from tokctl.imagetok.checkpoint import build_tokenizer, load_tokenizer, save_tokenizer


def grow(source: str, levels: list[int], out: str) -> None:
    old = load_tokenizer(source)
    old_levels = list(old.config["quantizer"]["levels"])
    finer = len(levels) == len(old_levels) and all(a >= b for a, b in zip(levels, old_levels))
    if not finer and (levels[:len(old_levels)] != old_levels or len(levels) <= len(old_levels)):
        raise SystemExit(f"levels {levels} must extend the tokenizer's {old_levels}, or refine "
                         f"each of its dimensions")
    config = copy.deepcopy(old.config)
    config["quantizer"]["levels"] = levels
    torch.manual_seed(0)
    new = build_tokenizer(config)
    kept, state = len(old_levels), new.state_dict()
    for key, value in old.model.state_dict().items():
        if key.endswith("to_code.weight") or key.endswith("to_code.bias"):
            state[key][:kept] = value            # new rows: the fresh layer's own init
        elif key.endswith("from_code.weight"):
            state[key].zero_()
            state[key][:, :kept] = value         # new columns: silent until trained
        elif state[key].shape == value.shape:
            state[key].copy_(value)
        else:
            raise SystemExit(f"{key}: {tuple(value.shape)} -> {tuple(state[key].shape)}; only "
                             f"the code projections may change shape")
    new.load_state_dict(state)
    save_tokenizer(out, new.eval(), config, {"grown_from": str(old.path), "levels": levels})
    print(f"{out}: {new.quantizer.codebook_size} codes ({new.quantizer.bits_per_id} bits a token)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python scripts/grow_fsq.py TOKENIZER LEVELS,... OUT.pt")
    grow(sys.argv[1], [int(v) for v in sys.argv[2].split(",")], sys.argv[3])
