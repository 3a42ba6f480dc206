"""Long-context prompt sets for sparse decoding, sized in the model's own tokens (so they are
built after the tokenizer loads, unlike the other prompt sets).

- ``data=passkey``: a pass key of random digits hidden at ``data.depth`` (0: the start of the
  filler, 1: its end; a list cycles over the prompts) in repeated filler text, asked for at the
  end; a prompt's ``answer`` is the key, scored by exact retrieval (the digits in the output).
- ``data=long``: a Spec-Bench question (rag or summarization) after the passages of the other
  questions, cut to ``data.context_tokens`` in all: a long document whose question comes last.

Both aim at ``data.context_tokens`` tokens for the whole encoded prompt (chat template included).
"""

from __future__ import annotations

import random

from omegaconf import OmegaConf

from tokctl.decode.data import Prompt, encode, open_dataset, rows_to_prompts
from tokctl.errors import UserError

NAMES = ("passkey", "long")

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorise it: I will ask you about it.\n\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def wanted(data_cfg) -> bool:
    return str(data_cfg.get("name")) in NAMES


def check(data_cfg, max_new_tokens: int, max_positions: int | None = None) -> None:
    """The keys' values, before anything heavy loads (the model's context once it is known)."""
    n = int(data_cfg.context_tokens)
    if n < 64:
        raise UserError(f"data.context_tokens={n} must be at least 64")
    if max_positions is not None and n + max_new_tokens > max_positions:
        raise UserError(f"data.context_tokens={n} plus max_new_tokens={max_new_tokens} is more "
                        f"than the model's context of {max_positions} tokens; lower one of them")
    for d in _depths(data_cfg):
        if not 0 <= d <= 1:
            raise UserError(f"data.depth={d}: a depth is a fraction of the filler, from 0 to 1")
    limit = data_cfg.get("limit")
    if limit is not None and int(limit) < 1:
        raise UserError(f"data.limit={limit} must be at least 1")


def build(data_cfg, tokenizer, max_new_tokens: int, max_positions: int) -> list[Prompt]:
    check(data_cfg, max_new_tokens, max_positions)
    chat = data_cfg.get("chat_template", "auto")
    if str(data_cfg.name) == "passkey":
        return passkey_prompts(data_cfg, tokenizer, chat)
    return long_prompts(data_cfg, tokenizer, chat)


def _depths(data_cfg) -> list[float]:
    d = data_cfg.get("depth", 0.5)
    d = OmegaConf.to_container(d) if OmegaConf.is_list(d) else d
    return [float(x) for x in (d if isinstance(d, list) else [d])] if d is not None else [0.5]


def _length(tokenizer, text: str, chat) -> int:
    return len(encode(tokenizer, [{"role": "user", "content": text}], chat))


def passkey_prompts(data_cfg, tokenizer, chat) -> list[Prompt]:
    target = int(data_cfg.context_tokens)
    rng = random.Random(int(data_cfg.get("seed", 0)))
    digits = int(data_cfg.get("digits", 5))
    depths = _depths(data_cfg)
    prompts = []
    for i in range(int(data_cfg.get("limit") or 8)):
        key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        depth = depths[i % len(depths)]
        needle = NEEDLE.format(key=key)
        bare = _length(tokenizer, INTRO + needle + QUESTION, chat)
        per = max(1, len(tokenizer(FILLER, add_special_tokens=False)["input_ids"]))
        if bare + per > target:
            raise UserError(f"data.context_tokens={target} leaves no room for filler: the passkey "
                            f"prompt's own text takes {bare} tokens with this tokenizer")
        count = (target - bare) // per
        while True:  # a repeat's tokens differ slightly at the joins: trim until it fits
            at = round(depth * count)
            text = INTRO + FILLER * at + needle + FILLER * (count - at) + QUESTION
            if _length(tokenizer, text, chat) <= target or count == 1:
                break
            count -= 1
        prompts.append(Prompt(id=f"passkey-{i}", category=f"depth {depth:g}", turns=[text],
                              answer=key))
    return prompts


def long_prompts(data_cfg, tokenizer, chat) -> list[Prompt]:
    path = data_cfg.get("path")
    if not path or path == "???":
        raise UserError("data=long needs data.path=FILE: Spec-Bench's question.jsonl")
    ds, where = open_dataset(str(path), None)
    cats = data_cfg.get("categories") or ["rag", "summarization"]
    cats = [cats] if isinstance(cats, str) else list(cats)
    rows = rows_to_prompts(ds, OmegaConf.create({}), where, str(path))
    by_cat = {c: [p for p in rows if p.category == c] for c in cats}
    empty = [c for c, ps in by_cat.items() if not ps]
    if empty:
        raise UserError(f"data.categories: {path} has no prompts in {', '.join(empty)}")
    # Questions alternate between the categories; the others' passages are the filler.
    order = [p for group in zip(*by_cat.values()) for p in group]
    target = int(data_cfg.context_tokens)
    prompts = []
    for i, p in enumerate(order[: int(data_cfg.get("limit") or 4)]):
        question = p.turns[0]
        room = target - _length(tokenizer, question, chat) - 2
        if room <= 0:
            continue  # this question alone is longer than the context asked for
        others = order[i + 1:] + order[:i]
        filler_ids: list[int] = []
        for o in others:
            filler_ids += tokenizer(o.turns[0] + "\n\n", add_special_tokens=False)["input_ids"]
            if len(filler_ids) >= room:
                break
        text = tokenizer.decode(filler_ids[:room]) + "\n\n" + question
        while _length(tokenizer, text, chat) > target and room > 0:
            room -= 16
            text = tokenizer.decode(filler_ids[:room]) + "\n\n" + question
        prompts.append(Prompt(id=f"long-{p.id}", category=p.category, turns=[text]))
    if not prompts:
        raise UserError(f"data.context_tokens={target}: every question is longer than that alone")
    return prompts
