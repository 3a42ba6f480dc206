"""ToMe as the official code runs it: tokctl's `tome` against an independent transcription.

The transcription below is written from the paper's description of bipartite soft matching plus
the official code's conventions (facebookresearch/ToMe, tome/merge.py and tome/patch/timm.py),
one image at a time, with plain Python bookkeeping, so it shares no code with tokctl's merge:

* tokens alternate between sets A (even positions) and B (odd) over the whole sequence;
* protected tokens ([CLS], distillation, registers: the first p) never merge: A ones have no
  edge out, B ones take no edge in;
* each A token's edge goes to its most similar B token (cosine similarity of the keys averaged
  over heads), the r best edges merge, size-weighted, as sum(x*size)/sum(size);
* the kept A tokens stay in input order when there are protected tokens (they come first),
  else by descending similarity; then the B tokens;
* r is lowered to half the unprotected tokens where fewer remain;
* the attention adds log(size) to every key's logit (proportional attention).
"""

import math

import pytest
import torch

from tokctl.vit.methods.tome import ToMe
from tokctl.vit.patch import apply_patch

from .tiny_models import pixels, tiny


def transcribed_merge(x, size, keys, r, p):
    """One image: x (N, C), size (N,), keys (N, d). Returns the merged x, size and kept r."""
    n = x.shape[0]
    r = min(r, (n - p) // 2)
    if r <= 0:
        return x, size, 0
    set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    best, match = [], []
    for a in set_a:
        if a < p:
            best.append(-math.inf)
            match.append(None)
            continue
        sims = [float(unit[a] @ unit[b]) if b >= p else -math.inf for b in set_b]
        j = max(range(len(sims)), key=lambda k: (sims[k], -k))
        best.append(sims[j])
        match.append(j)
    order = sorted(range(len(set_a)), key=lambda i: (-best[i], i))
    merged, kept = order[:r], order[r:]
    if p:
        kept = sorted(kept)
    total_b = [x[b] * size[b] for b in set_b]
    size_b = [size[b].clone() for b in set_b]
    for i in merged:
        a = set_a[i]
        total_b[match[i]] = total_b[match[i]] + x[a] * size[a]
        size_b[match[i]] = size_b[match[i]] + size[a]
    rows = {}  # sequence position of each surviving token -> (x, size)
    for i in kept:
        rows[set_a[i]] = (x[set_a[i]], size[set_a[i]])
    for j, b in enumerate(set_b):
        rows[b] = (total_b[j] / size_b[j], size_b[j])
    sequence = [t for t in range(p) if t in rows]
    sequence += [set_a[i] for i in kept if set_a[i] >= p] + [b for b in set_b if b >= p]
    return (torch.stack([rows[t][0] for t in sequence]), torch.stack([rows[t][1] for t in sequence]), r)


def transcribed_block(parts, x, size, r, p):
    """One block for one batch, official ToMeBlock order: attention (explicit softmax with
    log(size) added), merge on the mean key, MLP."""
    b, n, _ = x.shape
    q, k, v = parts.project(parts.norm1(x))
    logits = (q @ k.transpose(-1, -2)) * parts.scale + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    out = parts.out_proj(out)
    x = x + (parts.ls1(out) if parts.ls1 is not None else out)
    metric = k.mean(1)
    images = [transcribed_merge(x[i], size[i], metric[i], r, p) for i in range(b)]
    x = torch.stack([m[0] for m in images])
    size = torch.stack([m[1] for m in images])
    h = parts.mlp(parts.norm2(x))
    return x + (parts.ls2(h) if parts.ls2 is not None else h), size, images[0][2]


def transcribed_forward(model, info, images, r):
    """The model's own embeddings and head around the transcribed blocks."""
    state = {}

    def block_forward(index, hidden_states, *args, **kwargs):
        if index == 0:
            state["size"] = torch.ones(hidden_states.shape[:2])
            state["r"] = []
        x, state["size"], used = transcribed_block(info.parts[index], hidden_states, state["size"], r,
                                                   info.prefix_tokens)
        state["r"].append(used)
        return x

    for index, block in enumerate(info.blocks):
        block.forward = lambda h, *a, index=index, **k: block_forward(index, h, *a, **k)
    try:
        out = info.forward(images)
    finally:
        for block in info.blocks:
            del block.forward
    return out, state["r"]


LAYOUTS = [("vit", 1), ("deit", 2), ("siglip", 0), ("dinov2_registers", 5)]


@pytest.mark.parametrize("family,prefix", LAYOUTS)
@pytest.mark.parametrize("r", [5, 20])  # 20 needs lowering in the last layers (64 patches, 4 layers)
def test_tome_matches_the_transcription(family, prefix, r):
    model, info = tiny(family, layers=4)
    assert info.prefix_tokens == prefix
    x = pixels(batch=3)
    with torch.no_grad():
        want, used = transcribed_forward(model, info, x, r)
        method = ToMe(r=r)
        patch = apply_patch(model, method, info)
        got = info.forward(x)
        patch.remove()
    assert method.r_per_layer == used
    if r == 20:
        assert used[-1] < 20  # the clamp was exercised
    diff = (got - want).abs().max().item()
    print(f"{family} prefix={prefix} r={r}: r per layer {used}, max abs logit diff {diff:.2e}")
    assert diff <= 1e-5


def test_lowered_r_is_announced(capsys):
    model, info = tiny("vit", layers=4)
    method = ToMe(r=20)
    apply_patch(model, method, info)
    assert method.r_per_layer == [20, 20, 12, 6]
    assert method.planned_tokens(info) == [(65, 45), (45, 25), (25, 13), (13, 7)]
    out = capsys.readouterr().out
    assert "warning" in out and "layer 2: 20 -> 12" in out and "layer 3: 20 -> 6" in out


def test_triton_path_runs_in_the_model(force_triton):
    """The patched model really takes the Triton kernels when forced (interpreter mode here),
    and gives the torch path's logits."""
    from tokctl.kernels import token_merge as tm

    model, info = tiny("deit", layers=2, image=16)
    x = pixels(batch=2, image=16)
    with torch.no_grad():
        method = ToMe(r=6)
        patch = apply_patch(model, method, info)
        before = tm.CALLS["triton"]
        got = info.forward(x)
        assert tm.CALLS["triton"] == before + 2
        method.kernel = False
        want = info.forward(x)
        patch.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_are_whole_graphs_and_agree():
    """compile: every patched block is one graph (fullgraph: a break would raise), one per layer
    (static shapes), and the logits are the eager ones; the baseline runs compiled too."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, info = tiny("deit", layers=2, image=16)  # 16 patches + 2: r=20 becomes 8, then 4
    x = pixels(batch=2, image=16)
    with torch.no_grad():
        patch = apply_patch(model, ToMe(r=20), info)
        want = info.forward(x)
        with patch.disabled():
            base = info.forward(x)
        patch.remove()
        method = ToMe(r=20)
        patch = apply_patch(model, method, info, compile="aot_eager")
        got = info.forward(x)
        frames = counters["stats"]["unique_graphs"]
        again = info.forward(x)
        with patch.disabled():
            torch.testing.assert_close(info.forward(x), base, rtol=1e-5, atol=1e-5)
        patch.remove()
    assert method.r_per_layer == [8, 4]
    assert frames == info.depth and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got)
