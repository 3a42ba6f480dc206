"""Superposed Decoding, its n-gram model, the k-draft baselines and `tokctl decode drafts`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.decode.drafts import distinct_n, perplexity, prompt_state, unigram_f1
from tokctl.decode.methods.superposed import superposed_decode
from tokctl.decode.ngram import NGramModel, tokenizer_fingerprint
from tokctl.errors import UserError

runner = CliRunner()


def tokctl(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_error_line(output):
    """The one error line (a model-loaded note may come before it), no traceback."""
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and output.rstrip().endswith(errors[0].rstrip()), output
    assert "Traceback" not in output, output
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(),
            AutoTokenizer.from_pretrained(tiny_lm_dir))


def test_ngram_counts_mix_and_round_trip(tmp_path, tiny):
    _, tok = tiny
    ng = NGramModel.build([[1, 2, 3, 1, 2, 4]], n=3, tokenizer_info=tokenizer_fingerprint(tok))
    # after (2,): 3 once, 4 once; after (1, 2): 3 once, 4 once; after (3,): 1
    p = ng.mixed_probs([[9, 1, 2]], [3, 4, 5], weights=[0.25, 0.5])
    assert torch.allclose(p, torch.tensor([[0.375, 0.375, 0.0]], dtype=torch.float64))
    assert ng.mixed_probs([[7]], [1], weights=[1.0]).item() == 0  # unseen context adds nothing
    path = tmp_path / "ngram.json"
    ng.save(path)
    back = NGramModel.load(path)
    assert torch.equal(back.mixed_probs([[9, 1, 2]], [3, 4, 5], [0.25, 0.5]), p)
    back.check_tokenizer(tok)
    other = NGramModel.build([[1, 2]], n=2, tokenizer_info={"sha1": "x", "vocab_size": 5})
    with pytest.raises(UserError, match="another tokenizer"):
        other.check_tokenizer(tok)


def test_one_draft_without_ngram_is_greedy(tiny):
    """k=1 and alpha=0: the superposition is one token's embedding, so the pass is plain greedy."""
    model, _ = tiny
    prompt = [5, 17, 40, 2]
    drafts, _, forwards, _ = superposed_decode(model, prompt, k=1, max_new_tokens=10, alpha=0.0)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(10):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert drafts == [ids[len(prompt):]]
    assert forwards == 10  # prefill + one pass per further token


def test_k_drafts_from_one_pass_follow_the_ngram(tiny):
    model, tok = tiny
    corpus = [[5, 17, 40, 2] + [30, 31, 32, 33, 34, 35] * 3, [5, 17, 40, 2] + [50, 51, 52] * 5,
              [5, 17, 40, 2] + [60, 61] * 6]
    ng = NGramModel.build(corpus, n=4, tokenizer_info=tokenizer_fingerprint(tok))
    drafts, scores, forwards, _ = superposed_decode(
        model, [5, 17, 40, 2], k=3, max_new_tokens=8, ngram=ng, weights=[0.2, 0.3, 0.5],
        alpha=0.9, candidates=len(tok), temperature=1.0)
    assert len(drafts) == 3 and len({tuple(d) for d in drafts}) == 3
    assert all(len(d) == 8 for d in drafts)
    assert forwards == 8  # one pass per step for all three drafts
    assert scores == sorted(scores, reverse=True)
    # With the n-gram model dominant, the best drafts continue the corpus's cycles.
    assert sorted(d[:2] for d in drafts) == [[30, 31], [50, 51], [60, 61]]


def test_distinct_and_f1():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5
    assert unigram_f1("The cat sat", "the cat") == pytest.approx(0.8)


def _tiny_args(tiny_lm_dir, run):
    return ["model=hf", f"model.path={tiny_lm_dir}", f"hydra.run.dir={run}", "threads=1"]


def test_perplexity_from_the_prompt_cache_matches_a_full_forward(tiny):
    model, _ = tiny
    prompt, drafts = [5, 9, 14, 3, 7], [[11, 12, 13], [40, 2], [8]]
    state = prompt_state(model, prompt)
    for d in drafts:  # the cache is copied per draft, so each is scored from the prompt alone
        assert abs(perplexity(model, prompt, d, state) - perplexity(model, prompt, d)) < 1e-3
    assert perplexity(model, prompt, [], state) is None


def test_cli_ngram_superposed_and_drafts(tiny_lm_dir, tmp_path):
    code, out = tokctl("decode", "build-ngram", *_tiny_args(tiny_lm_dir, tmp_path / "ng"),
                       "seeds=[hello,count to five]", "samples_per_seed=2", "max_new_tokens=12")
    assert code == 0, out
    ngram = tmp_path / "ng" / "ngram.json"
    assert json.loads(ngram.read_text())["tokens"] > 0

    code, out = tokctl("decode", *_tiny_args(tiny_lm_dir, tmp_path / "sup"), "method=superposed",
                       "method.k=3", f"method.ngram={ngram}", "max_new_tokens=6", "warmup=0",
                       "data.limit=2")
    assert code == 0, out
    rows = [json.loads(x) for x in (tmp_path / "sup" / "samples.jsonl").read_text().splitlines()]
    assert all(len(r["extra"]["drafts"][0]) == 3 for r in rows)

    code, out = tokctl("decode", "drafts", *_tiny_args(tiny_lm_dir, tmp_path / "dr"),
                       f"superposed.ngram={ngram}", "ks=[2,3]", "max_new_tokens=5",
                       "data.limit=2", "warmup=0")
    assert code == 0, out
    metrics = json.loads((tmp_path / "dr" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ar", "superposed k=2", "nucleus k=2", "beam k=2",
                                      "superposed k=3", "nucleus k=3", "beam k=3"}
    assert all(m["perplexity"] > 1 for m in metrics["methods"].values())
    assert (tmp_path / "dr" / "drafts_cost_perplexity.png").is_file()

    code, out = tokctl("decode", "drafts", *_tiny_args(tiny_lm_dir, tmp_path / "dr1"),
                       f"superposed.ngram={ngram}", "ks=[2]", "families=[superposed]",
                       "max_new_tokens=4", "data.limit=1", "warmup=0")
    assert code == 0, out
    metrics = json.loads((tmp_path / "dr1" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ar", "superposed k=2"}


def test_cli_bad_k_and_foreign_ngram(tiny_lm_dir, tmp_path):
    code, out = tokctl("decode", *_tiny_args(tiny_lm_dir, tmp_path / "a"), "method=superposed",
                       "method.k=0")
    assert code != 0 and "k=0" in one_error_line(out)
    foreign = tmp_path / "foreign.json"
    NGramModel.build([[1, 2, 3]], n=3, tokenizer_info={"name": "gpt2", "vocab_size": 50257,
                                                       "sha1": "0" * 40}).save(foreign)
    code, out = tokctl("decode", *_tiny_args(tiny_lm_dir, tmp_path / "b"), "method=superposed",
                       f"method.ngram={foreign}", "warmup=0", "data.limit=1")
    assert code != 0 and "another tokenizer" in one_error_line(out)
    code, out = tokctl("decode", "drafts", *_tiny_args(tiny_lm_dir, tmp_path / "c"), "ks=[0,2]")
    assert code != 0 and "at least 1" in one_error_line(out)
    code, out = tokctl("decode", "drafts", *_tiny_args(tiny_lm_dir, tmp_path / "d"),
                       "families=[superposed,greedy]")
    assert code != 0 and "choose among" in one_error_line(out)
    code, out = tokctl("decode", "drafts", *_tiny_args(tiny_lm_dir, tmp_path / "e"), "ks=[2]")
    assert code != 0 and "superposed.ngram=" in one_error_line(out)
    code, out = tokctl("decode", "drafts", *_tiny_args(tiny_lm_dir, tmp_path / "f"), "ks=[2]",
                       f"superposed.ngram={foreign}", "data.limit=1", "warmup=0")
    assert code != 0 and "another tokenizer" in one_error_line(out)


def test_build_ngram_from_files(tiny_lm_dir, tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog")
    (tmp_path / "b.jsonl").write_text(json.dumps({"q": "hello", "a": ["the quick brown"]}) + "\n")
    code, out = tokctl("decode", "build-ngram", *_tiny_args(tiny_lm_dir, tmp_path / "ng"),
                       "source=files", f"files=[{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}]", "n=3")
    assert code == 0, out
    ng = NGramModel.load(tmp_path / "ng" / "ngram.json")
    assert ng.n == 3 and ng.tokens > 5
    code, out = tokctl("decode", "build-ngram", *_tiny_args(tiny_lm_dir, tmp_path / "x"),
                       "source=files", f"files=[{tmp_path / 'missing.txt'}]")
    assert code != 0 and "does not exist" in one_error_line(out)
