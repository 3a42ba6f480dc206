"""Where a decoding step's time goes on the image prior: CPU time (time.process_time, one
thread) of each part of a step, per step, for `ar` and the speculative methods through the
engine (tokctl/imagetok/prior_target.py).

    OMP_NUM_THREADS=1 nice -n 19 python bench/lantern_step_parts.py --images 30 \\
        --rows ar lantern:0.2,4,draft,probs,budget8 draft:6

Rows as in lantern_figures.py. Parts: for `ar` the target's one-token step and the draw; for a
speculative method the proposal (with, for a draft model, its one-token steps, its catch-up on
the verified tokens and its distributions, indented: they are inside the proposal), the
target's verification forward, the acceptance walk, commit, observe, and the rest of the
engine's loop. Each part is timed by wrapping it, which adds about a microsecond a call.
Methods run one after another, not interleaved: on a shared machine compare parts within a
row, and speeds across rows with lantern_figures.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lantern_figures import method_for  # noqa: E402

import tokctl.decode.methods.ar as ar_module  # noqa: E402
from tokctl.decode.sampling import Sampling, Settings  # noqa: E402
from tokctl.imagetok.sample import engine, load_draft, load_pair  # noqa: E402

clock = time.process_time


def timed(obj, name: str, key: str, acc: dict) -> None:
    """Wrap ``obj.name`` so that its CPU time adds up in ``acc[key]``."""
    f = getattr(obj, name)

    def wrapped(*a, **k):
        start = clock()
        out = f(*a, **k)
        acc[key] += clock() - start
        return out

    setattr(obj, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--rows", nargs="*", default=["ar", "lantern:0.2,4,draft,probs,budget8"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, prior = load_pair(None, None)
    draft = load_draft(tok, None)
    settings = Settings(max_new_tokens=prior.model.max_tokens, sampling=Sampling(1.0, 0))
    choose = ar_module.choose
    for spec in args.rows:
        label, method, seed = method_for(spec)
        target = engine(method, tok, prior, draft if method.needs_draft else None)
        acc: dict[str, float] = defaultdict(float)
        if spec.split(":")[0] == "ar":
            timed(target, "step", "target step", acc)
            timed(ar_module, "choose", "draw", acc)
        else:
            drafter = getattr(getattr(method, "base", method), "drafter", None)
            timed(method, "propose", "propose", acc)
            if drafter is not None:
                timed(drafter.target, "step", "  draft one-token steps", acc)
                timed(drafter, "sync", "  draft catch-up (sync)", acc)
                timed(drafter, "draft_probs", "  draft distributions", acc)
            timed(target, "forward", "target verification forward", acc)
            timed(method, "verify", "acceptance walk", acc)
            timed(target, "commit", "commit", acc)
            timed(method, "observe", "observe", acc)
        gen = torch.Generator().manual_seed(seed)
        method.generate([target.bos], settings, gen)  # warm-up
        acc.clear()
        steps, start = 0, clock()
        for _ in range(args.images):
            steps += len(method.generate([target.bos], settings, gen).accepted_per_step)
        total = clock() - start
        ar_module.choose = choose
        tokens = args.images * prior.model.max_tokens
        print(f"{label}: {1e3 * total / args.images:.2f} CPU ms an image, "
              f"{tokens / steps:.2f} tokens a step, {1e3 * total / steps:.3f} ms a step")
        for key, seconds in acc.items():
            print(f"   {key:32s} {1e3 * seconds / steps:.3f} ms a step "
                  f"({100 * seconds / total:.0f}%)")
        rest = total - sum(v for k, v in acc.items() if not k.startswith(" "))
        print(f"   {'rest of the loop':32s} {1e3 * rest / steps:.3f} ms a step "
              f"({100 * rest / total:.0f}%)")


if __name__ == "__main__":
    main()
