"""Batched decoding and SkipDecode: padded batch rows against single sequences, the layer
schedule, no skip = batched ar, and bad input in one line."""

import json

import pytest
import torch
from cli_helpers import tokctl
from transformers import AutoModelForCausalLM

from tokctl.decode.batch_job import last_number
from tokctl.decode.batched import BatchedLlama, decode_batch
from tokctl.decode.methods.skipdecode import SkipDecode
from tokctl.decode.sampling import Sampling, Settings
from tokctl.decode.target import make_target
from tokctl.errors import UserError


@pytest.fixture(scope="module")
def model(tiny_lm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()


PROMPTS = [[12, 40, 77, 5, 9, 31], [50, 51], [7, 8, 9, 10]]


def test_padded_batch_rows_match_single_sequences(model):
    engine = BatchedLlama(model)
    single = make_target(model, None, "fast")
    logits = engine.prefill(PROMPTS, capacity=8)
    nxt = torch.tensor([3, 4, 5])
    steps = engine.step(nxt)
    for row, p in enumerate(PROMPTS):
        assert torch.allclose(logits[row], single.prefill(p), atol=1e-4)
        assert torch.allclose(steps[row], single.forward([int(nxt[row])])[0], atol=1e-4)
        single.commit([0])


def test_the_schedule_falls_and_never_rises():
    m = SkipDecode(max_layers=10, min_layers=4, span=7)
    counts = [m.layers_at(t, 100) for t in range(1, 20)]
    assert counts[0] == 10 and counts[6:] == [4] * 13
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_no_skip_is_batched_ar_and_skipping_bottom_layers_changes_the_output(model, tiny_lm_dir):
    from tokctl.models.loading import LoadedModel

    loaded = LoadedModel(model=model, tokenizer=None, source="t", load_s=0.0)
    s = Settings(max_new_tokens=10, sampling=Sampling(), eos_ids=frozenset())
    engine = BatchedLlama(model)
    ar = decode_batch(engine, PROMPTS, s, None)
    full = SkipDecode(min_layers=2)
    full.setup(None, loaded)
    assert decode_batch(engine, PROMPTS, s, None, full.first_layer_at(10)) == ar
    skip = SkipDecode(min_layers=1, span=2)
    skip.setup(None, loaded)
    assert [skip.first_layer_at(10)(t) for t in (1, 2, 3)] == [0, 1, 1]
    decode_batch(engine, PROMPTS, s, None, skip.first_layer_at(10))  # runs; lossy
    with pytest.raises(ValueError, match="may not decrease"):
        engine.step(torch.tensor([1, 2, 3]), 0)
    with pytest.raises(UserError, match="min_layers=3"):
        SkipDecode(min_layers=3).setup(None, loaded)


def test_last_number():
    assert last_number("so 15 pencils cost $6.00.") == 6.0
    assert last_number("about 1,200 km") == 1200.0 and last_number("none") is None


def test_skipdecode_through_the_cli(tiny_lm_dir, tmp_path):
    base = ["decode", "model=hf", f"model.path={tiny_lm_dir}", "max_new_tokens=6", "warmup=0",
            "threads=1", "data.limit=3"]
    code, out = tokctl(*base, "method=skipdecode", "method.min_layers=1", "batch_size=2",
                       "baseline=ar", f"hydra.run.dir={tmp_path / 'a'}")
    assert code == 0, out
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["batch_size"] == 2 and m["num_samples"] == 3
    assert 0 <= m["agreement"] <= 1 and m["perplexity"] > 1 and m["speedup"] > 0
    code, out = tokctl(*base, "method=hybrid", "batch_size=2", f"hydra.run.dir={tmp_path / 'b'}")
    last = out.strip().splitlines()[-1]
    assert code != 0 and last.startswith("error:") and "batch" in last
