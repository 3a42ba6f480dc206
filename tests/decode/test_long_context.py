"""data=passkey and data=long: prompts sized in the model's tokens, and the figures they feed."""

import json

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from tokctl.decode import long_context, long_figures
from tokctl.decode.data import encode
from tokctl.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def cfg(**kw):
    base = {"name": "passkey", "context_tokens": 300, "depth": [0.1, 0.9], "limit": 4,
            "digits": 5, "seed": 0, "chat_template": "auto"}
    return OmegaConf.create({**base, **kw})


def length(tok, p):
    return len(encode(tok, [{"role": "user", "content": p.turns[0]}], "auto"))


def test_passkey_prompts_fit_and_hide_the_key_at_the_depth(tok):
    prompts = long_context.build(cfg(), tok, max_new_tokens=8, max_positions=512)
    assert len(prompts) == 4 and len({p.answer for p in prompts}) == 4
    for i, p in enumerate(prompts):
        assert len(p.answer) == 5 and p.answer.isdigit()
        assert 250 <= length(tok, p) <= 300
        text = p.turns[0]
        body = len(text) - len(long_context.INTRO) - len(long_context.QUESTION)
        where = (text.index(p.answer) - len(long_context.INTRO)) / body
        assert (where < 0.3) if i % 2 == 0 else (where > 0.7)
        assert p.category == ("depth 0.1" if i % 2 == 0 else "depth 0.9")
        assert text.rstrip().endswith("number only.")


def test_passkey_is_reproducible(tok):
    a = long_context.build(cfg(), tok, 8, 512)
    b = long_context.build(cfg(), tok, 8, 512)
    assert [p.turns for p in a] == [p.turns for p in b]


def test_long_prompts_end_with_their_question(tok, tmp_path):
    f = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [f"{c} passage {i}. " * 8 + f"Question {i}?"]}
            for i, c in enumerate(["rag", "summarization", "math", "rag", "summarization"])]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    c = OmegaConf.create({"name": "long", "path": str(f), "context_tokens": 400,
                          "categories": ["rag", "summarization"], "limit": 3, "chat_template": "auto"})
    prompts = long_context.build(c, tok, 8, 512)
    assert [p.category for p in prompts] == ["rag", "summarization", "rag"]
    for p in prompts:
        assert p.turns[0].endswith(f"Question {p.id.split('-')[1]}?")
        assert 300 <= length(tok, p) <= 400
        assert "math" not in p.turns[0]


@pytest.mark.parametrize("over,needle", [
    ({"context_tokens": 510}, "model's context of 512"),
    ({"context_tokens": 10}, "context_tokens=10"),
    ({"depth": 1.5}, "depth=1.5"),
])
def test_bad_values_are_user_errors(tok, over, needle):
    with pytest.raises(UserError, match=needle):
        long_context.build(cfg(**over), tok, max_new_tokens=8, max_positions=512)


def test_agreement():
    assert long_figures.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.5, 0.75)
    assert long_figures.agreement([1, 2], [1, 2, 3, 4]) == (0.5, 0.5)
    assert long_figures.agreement([], []) == (0.0, 0.0)


def test_group_figures():
    rows = [{"new_tokens": 10, "time_s": 3.0, "prefill_s": 1.0, "correct": True, "agreement": 1.0,
             "agreement_prefix": 1.0, "nll": (5.0, 10), "extra": {"cache_read": [[1.0, 0.5]]},
             "baseline": {"new_tokens": 10, "time_s": 5.0, "prefill_s": 1.0, "correct": False,
                          "nll": (5.0, 10)}}]
    out = long_figures.group_figures(rows, has_baseline=True)
    assert out["decode_tokens_per_s"] == 5.0 and out["baseline_decode_tokens_per_s"] == 2.5
    assert out["decode_speedup"] == pytest.approx(2.0)
    assert out["accuracy"] == 1.0 and out["baseline_accuracy"] == 0.0
    assert out["cache_read_per_layer"] == [1.0, 0.5] and out["cache_read"] == 0.75
    assert out["perplexity"] == pytest.approx(2.718281828 ** 0.5)
