"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported, so that the kernels' Triton paths
run on the CPU (slowly: small shapes only).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every cache tokctl writes (converted models, verify-cost tables, datasets' Arrow files) goes
    to one folder of this test session, never the user's ~/.cache. One folder for the session, so
    that the embedded model is converted once, not in each test; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("tokctl-cache")
    before = os.environ.get("TOKCTL_CACHE_DIR")
    os.environ["TOKCTL_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("TOKCTL_CACHE_DIR", None)
    else:
        os.environ["TOKCTL_CACHE_DIR"] = before


@pytest.fixture
def force_triton(monkeypatch):
    """Run the Triton path of a kernel even on CPU tensors (interpreter mode). Triton is a test
    dependency: without it a kernel test would compare the reference with itself, so it fails.
    The dispatch counts start at zero: a test asserts ``kernels.counts()["triton"]``."""
    from tokctl import kernels

    assert kernels.triton_available(), f"Triton does not import: {kernels.triton_import_error()}"
    monkeypatch.setenv("TOKCTL_TRITON", "1")
    kernels.reset_counts()
    yield


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_lm(folder, vocab_words: int = 320, layers: int = 2, seed: int = 0):
    """A tiny random Llama with a real (trained, byte-level BPE) tokenizer and a chat template,
    saved as a Hugging Face folder: loads in milliseconds, exercises every code path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 3,
              "def average(values): return sum(values) / len(values)",
              "Summarise the passage in two sentences. A train travels 180 km in 2 hours.",
              "Hello, how are you? I am fine, thank you. 1 2 3 4 5 6 7 8 9 0"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_words, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=fast.eos_token_id,
                      bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
