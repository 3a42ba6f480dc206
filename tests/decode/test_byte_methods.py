"""method=bytes, method=heal and method=byte_ensemble on tiny random Llamas, and data=cut."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_lm
from tokctl.decode.byte_view import ByteView
from tokctl.decode.byte_vocab import token_bytes
from tokctl.decode.cut import cut_prompts
from tokctl.decode.data import Prompt
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.byte_ensemble import ByteEnsemble
from tokctl.decode.methods.bytes import ByteDecoding
from tokctl.decode.methods.heal import TokenHealing
from tokctl.decode.sampling import Sampling, Settings
from tokctl.decode.target import make_target
from tokctl.errors import UserError
from tokctl.models.loading import LoadedModel


def load(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tok, source=str(folder), load_s=0.0)


@pytest.fixture(scope="module")
def loaded(tiny_lm_dir):
    return load(tiny_lm_dir)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second tiny model with a different tokenizer (another vocabulary size and seed)."""
    folder = tmp_path_factory.mktemp("tiny_lm_other")
    build_tiny_lm(folder, vocab_words=400, seed=3)
    return load(folder)


def settings(n=6, **kw):
    return Settings(max_new_tokens=n, sampling=Sampling(**kw), eos_ids=frozenset({2}))


def setup(method, loaded):
    method.setup(make_target(loaded.model, loaded.tokenizer), loaded)
    return method


def ids(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_greedy_bytes_follow_the_argmax_of_the_view(loaded):
    m = setup(ByteDecoding(prune=0.0, max_new_bytes=12), loaded)
    prompt = ids(loaded, "the quick bro")
    gen = m.generate(prompt, settings(), None)
    assert gen.finish_reason in ("length", "eos") and gen.new_bytes
    v = ByteView(m.target, loaded.tokenizer, [2], prune=0.0)
    v.start(prompt)
    for b in gen.new_bytes:
        assert int(v.distribution().argmax()) == b
        v.append(b)
    assert gen.steps >= 1 and gen.extra["model_calls"] == gen.steps


def test_sampled_bytes_are_reproducible_with_the_seed(loaded):
    m = setup(ByteDecoding(max_new_bytes=10), loaded)
    prompt = ids(loaded, "Hello, how are")
    s = settings(temperature=1.0, top_p=0.9)
    a = m.generate(prompt, s, torch.Generator().manual_seed(1)).new_bytes
    b = m.generate(prompt, s, torch.Generator().manual_seed(1)).new_bytes
    assert a == b and len(a) <= 10


def test_byte_limit_defaults_to_max_new_tokens_tokens(loaded):
    m = setup(ByteDecoding(), loaded)
    gen = m.generate(ids(loaded, "the lazy"), settings(n=3), None)
    if gen.finish_reason == "length":
        assert len(gen.tokens) == 3


def test_healing_regenerates_the_last_token(loaded):
    heal = setup(TokenHealing(), loaded)
    prompt = ids(loaded, "the quick bro")
    vocab = token_bytes(loaded.tokenizer, heal.target.vocab_size)
    tail = vocab.bytes[prompt[-1]]
    gen = heal.generate(prompt, settings(), None)
    spelled = b"".join(vocab.bytes[t] for t in gen.tokens)
    assert spelled.startswith(tail) and gen.new_bytes == spelled[len(tail):]
    assert heal.run_info()["prompts_healed"] == 1


def test_healing_a_one_token_prompt_is_plain_decoding(loaded):
    heal, ar = setup(TokenHealing(), loaded), setup(Autoregressive(), loaded)
    prompt = ids(loaded, "the")[:1]
    assert heal.generate(prompt, settings(), None).tokens == \
        ar.generate(prompt, settings(), None).tokens


def test_scores_differ_by_how_the_prompt_is_read(loaded):
    """The reference's likelihood per way: naive reads the cut prompt's tokens as they are,
    healing and byte-level reinterpret its end; all are finite log-probabilities."""
    prompt = ids(loaded, "the quick bro")
    scores = {m.name: setup(m, loaded).score(prompt, b"wn fox", settings())
              for m in (Autoregressive(), TokenHealing(), ByteDecoding(prune=0.0))}
    assert all(-100 < s < 0 for s in scores.values())
    assert scores["ar"] != pytest.approx(scores["bytes"])


def test_ensemble_of_two_tokenizers(loaded, other):
    assert loaded.tokenizer.get_vocab() != other.tokenizer.get_vocab()
    loaded.draft = other
    prompt = ids(loaded, "def average(values): return su")
    for how in ("mixture", "product"):
        m = setup(ByteEnsemble(combine=how, prune=0.0, max_new_bytes=8), loaded)
        gen = m.generate(prompt, settings(), None)
        assert len(gen.new_bytes) <= 8 and gen.steps == gen.extra["calls_target"] + \
            gen.extra["calls_other"]
        views = m.views(prompt, settings(), 64)
        a, b = views[0].distribution(), views[1].distribution()
        assert float(a.sum()) == pytest.approx(1) and float(b.sum()) == pytest.approx(1)
    # weight 1 and 0 give each model alone: its own byte-level score
    solo = setup(ByteDecoding(prune=0.0), loaded).score(prompt, b"m(values)", settings())
    ens = setup(ByteEnsemble(weight=1.0, prune=0.0), loaded)
    assert ens.score(prompt, b"m(values)", settings()) == pytest.approx(solo, abs=1e-6)
    mixed = setup(ByteEnsemble(weight=0.5, prune=0.0), loaded).score(prompt, b"m(values)",
                                                                      settings())
    alone_b = setup(ByteEnsemble(weight=0.0, prune=0.0), loaded).score(prompt, b"m(values)",
                                                                        settings())
    # a 50/50 mixture loses at most log 2 per byte against the better model
    assert mixed >= max(solo, alone_b) - len(b"m(values)") * 0.6932


def test_ensemble_options_are_checked():
    with pytest.raises(UserError, match="combine"):
        ByteEnsemble(combine="average")
    with pytest.raises(UserError, match="weight"):
        ByteEnsemble(weight=2)
    with pytest.raises(UserError, match="prune"):
        ByteDecoding(prune=1.5)


def cut_cfg(**kw):
    return OmegaConf.create({"cut": True, "cut_inside": "word", "cut_seed": 0,
                             "min_prefix_bytes": 8, "reference_bytes": 12, "match_bytes": 6, **kw})


def test_cut_falls_inside_a_word_and_keeps_the_reference():
    text = "Write a function that returns the average of a list of numbers."
    prompts = cut_prompts([Prompt(str(i), "c", [text]) for i in range(20)], cut_cfg())
    assert len(prompts) == 20 and len({p.turns[0] for p in prompts}) > 3
    for p in prompts:
        cut = p.turns[0]
        assert text.startswith(cut + p.reference)
        assert cut[-1].isalnum() and p.reference[0].isalnum()
        assert len(cut.encode()) >= 8 and len(p.reference.encode()) >= 12 and p.match_bytes == 6
    again = cut_prompts([Prompt(str(i), "c", [text]) for i in range(20)], cut_cfg())
    assert [p.turns for p in again] == [p.turns for p in prompts]


def test_cut_needs_room():
    with pytest.raises(UserError, match="long enough"):
        cut_prompts([Prompt("0", "c", ["too short"])], cut_cfg())
    with pytest.raises(UserError, match="match_bytes"):
        cut_prompts([Prompt("0", "c", ["x" * 80])], cut_cfg(match_bytes=20))
