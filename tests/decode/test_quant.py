"""Weight-only int8: close to the float layer, and the lean forward runs the same int8 model as HF."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokctl.decode.target import FastTarget
from tokctl.models.quant import Int8Linear, quantize, weight_bytes


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
