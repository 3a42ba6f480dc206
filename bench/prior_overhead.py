"""The decoding engine's own work on the token prior, before and after a change to the prior's
target (tokctl/imagetok/prior_target.py): each method runs image by image with the target of
git revision --before and the working tree's alternately, in one process, so that a shared
machine's load hits both alike; also checks that both give the same tokens from the same seed.

    OMP_NUM_THREADS=1 nice -n 19 python bench/prior_overhead.py --before main --images 30 \\
        --rows ar lookup draft:4 lantern:0.2,4

Prints per row: images/s before and after, their ratio, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lantern_figures import method_for  # noqa: E402

from tokctl.decode.sampling import Sampling, Settings  # noqa: E402
from tokctl.imagetok import sample  # noqa: E402
from tokctl.imagetok.prior_target import PriorSource, PriorTarget  # noqa: E402


def old_target_class(rev: str):
    """PriorTarget as it is at ``rev``."""
    text = subprocess.run(["git", "show", f"{rev}:tokctl/imagetok/prior_target.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "prior_target_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("prior_target_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PriorTarget


def engine(cls, spec, tok, prior, draft):
    """``spec``'s method on a target of class ``cls`` (its draft prior's target too)."""
    _, method, _ = method_for(spec)
    d = None
    if method.needs_draft:
        d = PriorSource(f"tokctl-prior:{draft.hash:06x}", draft.model)
        d.decode_target = lambda: cls(draft.model, d.source)
    loaded = PriorSource(f"tokctl-prior:{prior.hash:06x}", prior.model, d)
    loaded.code_vectors = sample.code_vectors(tok)
    target = cls(prior.model)
    method.setup(target, loaded)
    return method, target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="main")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--rows", nargs="*", default=["ar", "lookup", "draft:4", "lantern:0.2,4"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, prior = sample.load_pair(None, None)
    draft = sample.load_draft(tok, None)
    settings = Settings(max_new_tokens=prior.model.max_tokens, sampling=Sampling(1.0, 0))
    classes = {"before": old_target_class(args.before), "after": PriorTarget}
    for spec in args.rows:
        runs = {}
        for name, cls in classes.items():
            method, target = engine(cls, spec, tok, prior, draft)
            method.generate([target.bos], settings, torch.Generator().manual_seed(99))  # warm-up
            runs[name] = {"method": method, "target": target, "seconds": 0.0, "tokens": [],
                          "gen": torch.Generator().manual_seed(1)}
        for _ in range(args.images):
            for r in runs.values():
                start = time.perf_counter()
                g = r["method"].generate([r["target"].bos], settings, r["gen"])
                r["seconds"] += time.perf_counter() - start
                r["tokens"].append(g.tokens)
        b, a = (args.images / runs[k]["seconds"] for k in ("before", "after"))
        same = runs["before"]["tokens"] == runs["after"]["tokens"]
        print(f"{spec}: before {b:.2f} images/s, after {a:.2f} images/s, after/before {a / b:.2f}x, "
              f"tokens {'identical' if same else 'DIFFERENT'}", flush=True)


if __name__ == "__main__":
    main()
