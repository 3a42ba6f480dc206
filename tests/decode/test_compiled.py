"""The compiled decode step: whole graphs, a few fixed shapes, the same logits as the eager step.

Dynamo's capture (whole graphs, no recompiles after the warm-up) does not depend on the backend,
so the test compiles with aot_eager (traced and functionalised like Inductor's input, without its
C++ build, which takes minutes on a busy 2-core machine); Inductor runs in the CLI and benchmarks.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokctl.decode.target import FastTarget


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _trees(gen, steps):
    """Mixed tree sizes (1 to 8 nodes: buckets 1, 2, 4, 8), random parents before children."""
    for _ in range(steps):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
        tokens = torch.randint(0, 97, (n,), generator=gen).tolist()
        yield tokens, parents


def _decode(target, prompt, steps, seed):
    """Verify-and-commit steps: commit the path to the deepest node, as a speculative step does."""
    gen = torch.Generator().manual_seed(seed)
    out = [target.prefill(prompt)]
    for tokens, parents in _trees(gen, steps):
        logits = target.forward(tokens, parents)
        out.append(logits)
        node, path = len(tokens) - 1, []
        while node >= 0:
            path.append(node)
            node = parents[node]
        target.commit(path[::-1])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_steps_match_eager_without_breaks_or_recompiles(tiny, dtype):
    """bf16 runs one-token steps as two rows (``min_rows``): still no graph beyond the warm-up."""
    import copy

    import torch._dynamo.utils as du

    model = tiny if dtype == torch.float32 else copy.deepcopy(tiny).to(dtype)
    prompt = list(range(3, 20))
    eager = FastTarget(model, None)
    compiled = FastTarget(model, None, compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    du.counters.clear()
    assert compiled.compile_now() >= 1  # the warm-up: every graph the steps below may take
    frames = du.counters["stats"]["unique_graphs"]
    assert frames >= 1 and not du.counters["graph_break"], dict(du.counters["graph_break"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _decode(compiled, prompt, 20, seed=1)
    assert du.counters["stats"]["unique_graphs"] == frames, "recompiled after the warm-up"
    assert not du.counters["graph_break"]
    want = _decode(eager, prompt, 20, seed=1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


def test_compiled_step_freezes_weights_and_takes_the_cache_as_inputs(tiny):
    """On the CPU the weights are frozen into the graph (what lets Inductor prepack them), and
    each layer's cache is a whole graph input of its own (what lets Inductor write it in place:
    a write into a view of one stacked cache became a copy of the whole stack, per layer)."""
    seen = []

    def recording_backend(gm, example_inputs):
        seen.append([t for t in example_inputs if torch.is_tensor(t)])
        return gm.forward

    torch._dynamo.reset()
    target = FastTarget(tiny, None, compile=True, compile_backend=recording_backend)
    target.prefill(list(range(3, 20)))
    target.forward([5, 6], [-1, 0])
    assert seen, "the step was not compiled"
    inputs = {t.data_ptr() for t in seen[-1]}
    weights = {p.data_ptr() for p in target.fast.parameters()}
    assert not inputs & weights, "weights reached the graph as inputs: not frozen"
    assert {t.data_ptr() for t in target.cache.tensors()} <= inputs
