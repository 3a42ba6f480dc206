"""The byte-level view of a token-level model, checked against brute-force enumeration of every
tokenisation on a tiny random Llama with a small trained BPE tokenizer."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_lm
from tokctl.decode.byte_view import EOS, ByteView, combine, loglik
from tokctl.decode.byte_vocab import token_bytes
from tokctl.decode.target import make_target
from tokctl.errors import UserError


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    return model, tok


def view(lm, prune=0.0, backend="fast"):
    model, tok = lm
    return ByteView(make_target(model, tok, backend), tok, [tok.eos_token_id], prune=prune)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def canonical_probs(lm, context, seq):
    """The canonical next-token distribution after context + seq, from a full forward pass."""
    model, tok = lm
    vocab = token_bytes(tok, model.config.vocab_size)
    with torch.no_grad():
        logits = model(torch.tensor([context + list(seq)])).logits[0, -1]
    allowed = vocab.has_bytes.clone()
    allowed[tok.eos_token_id] = True
    p = torch.softmax(logits.double(), -1) * allowed.double()
    cand = [t for t in range(vocab.size) if p[t] > 0 and vocab.has_bytes[t]]
    ok = vocab.canonical(tuple(seq), b"".join(vocab.bytes[t] for t in seq), cand)
    bad = [t for t, good in zip(cand, ok) if not good]
    if bad:
        p[bad] = 0.0
    return p / p.sum()


def brute_force(lm, context, x, first_extends=False):
    """P(next byte | x) over 257 outcomes, summing every token sequence after ``context`` whose
    bytes cover x (the Byte-Token Representation Lemma), without the view's machinery; and P(x).
    ``first_extends``: only sequences whose first token spells all of x or more (token healing)."""
    model, tok = lm
    vocab = token_bytes(tok, model.config.vocab_size)
    out = torch.zeros(257, dtype=torch.float64)

    def walk(seq, prob, j):
        p = canonical_probs(lm, context, seq)
        rest = x[j:]
        for t in torch.nonzero(p).view(-1).tolist():
            q = float(p[t])
            if t == tok.eos_token_id:
                out[EOS] += prob * q if not rest else 0.0
                continue
            b = vocab.bytes[t]
            if first_extends and not seq and len(b) < len(rest):
                continue
            if len(b) <= len(rest) and rest.startswith(b):
                walk(seq + (t,), prob * q, j + len(b))
            elif len(b) > len(rest) and b.startswith(rest):
                out[b[len(rest)]] += prob * q

    walk((), 1.0, 0)
    total = float(out.sum())
    return out / total, total


def test_distribution_sums_to_one(lm):
    for prune in (0.0, 1e-4):
        v = view(lm, prune)
        d = v.next_byte_distribution(b"the quick bro")
        assert d.shape == (257,) and float(d.min()) >= 0
        assert float(d.sum()) == pytest.approx(1.0, abs=1e-9)
        for b in b"wn fox jumps":
            d = v.next_byte_distribution(v._seen + bytes([b]))
            assert float(d.sum()) == pytest.approx(1.0, abs=1e-9)


def test_matches_brute_force_from_a_fresh_prompt(lm):
    model, tok = lm
    v = view(lm)
    d = v.next_byte_distribution(b"the quick bro")
    context = encode(tok, "the quick")
    assert v.context_ids == context  # the anchor: the space before the last word
    expected, _ = brute_force(lm, context, b" bro")
    torch.testing.assert_close(d, expected, atol=1e-6, rtol=0)


def test_generating_byte_by_byte_reuses_the_covers_exactly(lm):
    """Fed one byte at a time (nodes carried over, the anchor moving past a space), the view
    gives what a fresh enumeration from the moved anchor gives."""
    model, tok = lm
    v = view(lm)
    v.next_byte_distribution(b"the quick br")
    calls = v.calls
    d = v.next_byte_distribution(b"the quick brown f")
    assert v.calls - calls <= len("own f")  # at most one model call per byte
    assert v.context_length + len(v.pending) == len(encode(tok, "the quick brown"))
    expected, _ = brute_force(lm, encode(tok, "the quick brown"), b" f")
    torch.testing.assert_close(d, expected, atol=1e-6, rtol=0)


def test_byte_token_representation_lemma(lm):
    """For a prompt ending on a token boundary, the byte-level probability of the next token's
    bytes is the token-level probability chain summed over that token and every other
    tokenisation covering its bytes (brute force), so at least the token's own probability."""
    model, tok = lm
    context = encode(tok, "def average(values): return sum")
    p = canonical_probs(lm, context, ())
    vocab = token_bytes(tok, model.config.vocab_size)
    long = torch.tensor([len(b) >= 3 for b in vocab.bytes])  # several tokenisations to sum
    token = int((p * long).argmax())
    spelled = vocab.bytes[token]
    v = view(lm)
    v.start(context, "pinned")
    byte_level = math.exp(loglik(v, spelled))
    _, covers = brute_force(lm, context, spelled)
    assert byte_level == pytest.approx(covers, rel=1e-5)
    # the token itself is one of the covers (with a model trained on canonical encodings the
    # others, longer tokens that start with the same bytes, are what separates the two)
    assert byte_level >= float(p[token]) * (1 - 1e-6)


def test_pinned_first_byte_is_the_token_distribution_by_first_byte(lm):
    model, tok = lm
    context = encode(tok, "Hello, how are")
    v = view(lm)
    v.start(context, "pinned")
    p = canonical_probs(lm, context, ())
    vocab = token_bytes(tok, model.config.vocab_size)
    expected = torch.zeros(258, dtype=torch.float64).scatter_add_(0, vocab.first_byte, p)[:257]
    expected[EOS] = p[tok.eos_token_id]
    torch.testing.assert_close(v.distribution(), expected, atol=1e-6, rtol=0)


def test_healing_covers_only_tokens_extending_the_last_one(lm):
    model, tok = lm
    ids = encode(tok, "the quick bro")
    tail = token_bytes(tok, model.config.vocab_size).bytes[ids[-1]]
    v = view(lm)
    v.start(ids, "heal")
    assert v.context_ids == ids[:-1]
    expected, _ = brute_force(lm, ids[:-1], tail, first_extends=True)
    torch.testing.assert_close(v.distribution(), expected, atol=1e-6, rtol=0)


def test_pruning_stays_close_and_costs_fewer_checks(lm):
    exact = view(lm, 0.0).next_byte_distribution(b"Summarise the passage in two sent")
    pruned = view(lm, 1e-3).next_byte_distribution(b"Summarise the passage in two sent")
    assert float((exact - pruned).abs().sum()) < 0.05


def test_the_view_runs_on_the_hf_backend_too(lm):
    a = view(lm, 0.0, "fast").next_byte_distribution(b"the lazy do")
    b = view(lm, 0.0, "hf").next_byte_distribution(b"the lazy do")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_combine_mixture_and_product():
    a = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    b = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    torch.testing.assert_close(combine([a, b], [0.5, 0.5], "mixture"),
                               torch.tensor([0.35, 0.55, 0.1], dtype=torch.float64))
    prod = combine([a, b], [0.5, 0.5], "product")
    expected = torch.sqrt(a * b)
    torch.testing.assert_close(prod, expected / expected.sum())
    torch.testing.assert_close(combine([a, b], [1.0, 0.0], "product"), a)


def test_empty_prompt_is_a_user_error(lm):
    with pytest.raises(UserError, match="empty prompt"):
        view(lm).next_byte_distribution(b"")


def test_a_tokenizer_that_cannot_map_bytes_is_a_user_error(tmp_path):
    from tokenizers import normalizers

    build_tiny_lm(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UserError, match="cannot map its tokens to bytes"):
        token_bytes(tok)
