"""Weight formats: int8 close to the float layer and run by the lean forward as by HF; prepacked
bf16 the same product, batch-invariant."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokctl.decode.target import FastTarget
from tokctl.models.quant import (Int8Linear, PackedLinear, fuse_linears, prepack, prepack_applies,
                                 quantize, weight_bytes)


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear(layer)
    x = torch.randn(7, 64)
    assert q.weight.dtype == torch.int8
    rel = (q(x) - layer(x)).norm() / layer(x).norm()
    assert rel < 0.02, rel


def test_quantized_model_matches_hf_forward_and_reads_fewer_bytes():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    before = weight_bytes(model)
    quantize(model, "int8")
    assert weight_bytes(model) < 0.4 * before
    ids = torch.randint(0, 101, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    t = FastTarget(model, None)
    torch.testing.assert_close(t.prefill(ids[:8]), ref[7], atol=1e-4, rtol=1e-4)
    out = t.forward(ids[8:12].tolist(), [-1, 0, 1, 2])
    torch.testing.assert_close(out, ref[8:12], atol=1e-4, rtol=1e-4)


def _bf16_llama(vocab=3001, hidden=96, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


def test_packed_linear_is_the_linear_and_batch_invariant():
    """A row's product does not depend on how many rows run with it: the property that makes a
    one-token ar step and a many-token tree agree bit for bit in bf16. SmolLM2's head's shape:
    there, on this CPU, a plain bf16 product of 64 rows rounds row 0 differently from 1 row."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 49152, bias=False).to(torch.bfloat16)
    packed = PackedLinear(layer.weight)
    x = torch.randn(65, 576, dtype=torch.bfloat16)
    torch.testing.assert_close(packed(x), layer(x), atol=0.05, rtol=0.02)
    one = packed(x[:1])
    for m in (2, 7, 33, 64, 65):
        assert torch.equal(packed(x[:m])[:1], one), m
    assert packed(x[None, :3]).shape == (1, 3, 49152)


def test_prepacked_tree_rows_equal_one_token_steps():
    model = prepack(_bf16_llama())
    ids = torch.randint(0, 3001, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_block_rows_equal_steps(model, ids, prefix=30)


def assert_block_rows_equal_steps(model, ids, prefix, siblings=0, **target_opts):
    """The tokens after ``prefix`` run as one block and one at a time: each row bit for bit.
    ``siblings``: the block is a tree where each of those tokens follows that many sibling decoys
    (so its slot lies past its position, with masked slots between it and its ancestors)."""
    tree, chain = FastTarget(model, None, **target_opts), FastTarget(model, None, **target_opts)
    tree.prefill(ids[:prefix])
    chain.prefill(ids[:prefix])
    tokens, parents, rows = [], [], []
    for token in ids[prefix:]:
        parent = rows[-1] if rows else -1
        tokens += [(token + 1 + j) % model.config.vocab_size for j in range(siblings)] + [token]
        parents += [parent] * (siblings + 1)
        rows.append(len(tokens) - 1)
    block = tree.forward(tokens, parents)
    for i, token in enumerate(ids[prefix:]):
        step = chain.forward([token])
        chain.commit([0])
        assert torch.equal(block[rows[i]], step[0]), i


def test_prepack_choice():
    fp32 = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()
    assert not prepack_applies(fp32, "auto")
    with pytest.raises(ValueError, match="bfloat16"):
        prepack_applies(fp32, "true")
    assert prepack_applies(_bf16_llama(layers=1), "auto")
    assert not prepack_applies(_bf16_llama(layers=1), "false")
    assert not prepack_applies(_bf16_llama(layers=1), "auto", quant="int8")
    assert not prepack_applies(_bf16_llama(layers=1), "auto", compiled=True)
    with pytest.raises(ValueError, match="cannot be compiled"):
        prepack_applies(_bf16_llama(layers=1), "true", compiled=True)


@pytest.mark.parametrize("fmt", ["plain", "int8", "prepacked"])
def test_fused_layers_give_each_layers_output_side_by_side(fmt):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if fmt == "prepacked" else torch.float32
    layers = [torch.nn.Linear(64, out, bias=False).to(dtype) for out in (48, 16, 16)]
    if fmt == "int8":
        layers = [Int8Linear(m) for m in layers]
    elif fmt == "prepacked":
        layers = [PackedLinear(m.weight) for m in layers]
    x = torch.randn(5, 64, dtype=dtype)
    apart = torch.cat([m(x) for m in layers], dim=-1)
    fused = fuse_linears(layers)
    assert fused.out_features == 80 and fused.in_features == 64
    torch.testing.assert_close(fused(x), apart, atol=1e-5, rtol=1e-5)
    if fmt == "plain":  # the originals now read the fused weight's rows: no second copy
        assert layers[1].weight.data_ptr() == fused.weight.data_ptr() + 48 * 64 * 4
        torch.testing.assert_close(torch.cat([m(x) for m in layers], dim=-1), apart)


def test_exact_rows_agree_past_512_cached_positions():
    """exact=true: a tree row and a one-token step at the same position agree bit for bit even
    with a long cache, where attention over different key counts would round differently."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=384, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)
    model = prepack(LlamaForCausalLM(cfg).eval().to(torch.bfloat16))
    ids = torch.randint(0, 500, (640,), generator=torch.Generator().manual_seed(2)).tolist()
    assert_block_rows_equal_steps(model, ids, prefix=600, exact=True)


def test_exact_tree_rows_agree_wherever_the_tree_puts_them():
    """exact=true: a tree node sits at a later slot than its position, past masked siblings, and
    still gets the one-token step's logits bit for bit (bf16 attention alone does not: it groups
    its sums by slot)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=384, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)
    model = prepack(LlamaForCausalLM(cfg).eval().to(torch.bfloat16))
    ids = torch.randint(0, 500, (624,), generator=torch.Generator().manual_seed(3)).tolist()
    assert_block_rows_equal_steps(model, ids, prefix=600, siblings=3, exact=True)
