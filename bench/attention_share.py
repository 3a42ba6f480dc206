"""Where a one-token decode step's time goes at each context length: the whole step against the
same step with attention left out (a stub that reads no cache), so attention's share of the step
is the most that sparse attention can save there.

    python bench/attention_share.py [--contexts 2048 4096 7680] [--rounds 20] [--threads 2]

Embedded SmolLM2-135M, fp32, the lean forward, eager steps, over a cache of random keys and
values; the two kinds of step alternate, the median of ``--rounds`` after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 7680])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from tokctl.config import conf_dir
    from tokctl.decode.target import make_target
    from tokctl.models.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    loaded = load_causal_lm(OmegaConf.load(conf_dir("decode") / "model" / "smollm2-135m.yaml"))
    target = make_target(loaded.model, loaded.tokenizer, "fast")
    fast = target.fast
    stub = lambda layer, q, k, v, allowed: torch.zeros_like(q)  # noqa: E731
    print(f"{'context':>8} {'step ms':>8} {'no-attention ms':>16} {'attention share':>16}")
    for n in args.contexts:
        # A step's cost does not depend on what the cache holds: fill it with random keys and
        # values instead of a prefill (minutes at these lengths on a CPU).
        target.prefill([1, 2], capacity=n + 8)
        g = torch.Generator().manual_seed(0)
        for t in target.cache.tensors():
            t[:, :n] = torch.randn(t[:, :n].shape, generator=g, dtype=t.dtype)
        target.length = n
        ids = [1000]
        times = {"full": [], "stub": []}
        for r in range(args.rounds + 2):
            for kind in ("full", "stub"):
                fast.layer_attention = stub if kind == "stub" else None
                start = time.perf_counter()
                target.forward([ids[-1]])
                took = time.perf_counter() - start
                target.commit([])  # drop it: every step runs at the same length
                if r >= 2:
                    times[kind].append(took)
        fast.layer_attention = None
        full, bare = statistics.median(times["full"]), statistics.median(times["stub"])
        print(f"{n:>8} {1e3 * full:>8.1f} {1e3 * bare:>16.1f} {(full - bare) / full:>16.2f}")


if __name__ == "__main__":
    main()
