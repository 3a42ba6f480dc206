"""Prompt sets for `tokctl decode`: the built-in set, Spec-Bench files, plain {"prompt": ...} lines.

Every problem with a data file is found before any model is loaded and reported as one line that
names the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokctl.errors import UserError

BUILTIN = Path(__file__).parent / "prompts" / "builtin.jsonl"


@dataclass
class Prompt:
    id: str
    category: str
    turns: list[str]


def _parse_line(obj: Any, where: str, index: int) -> Prompt:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object per line")
    if "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{where}: 'turns' must be a non-empty list of strings")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise UserError(f"{where}: 'prompt' must be a string")
        turns = [obj["prompt"]]
    else:
        raise UserError(f"{where}: needs 'turns' (Spec-Bench) or 'prompt'")
    if any(not t.strip() for t in turns):
        raise UserError(f"{where}: empty prompt")
    qid = obj.get("question_id", obj.get("id", index))
    return Prompt(id=str(qid), category=str(obj.get("category") or "all"), turns=list(turns))


def read_jsonl(path: Path) -> list[Prompt]:
    if not path.exists():
        raise UserError(f"data file {path} does not exist (set data.path=FILE)")
    if path.is_dir():
        raise UserError(f"data.path={path} is a folder; give a .jsonl file")
    prompts = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        prompts.append(_parse_line(obj, where, n - 1))
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def load_prompts(data_cfg) -> list[Prompt]:
    path = data_cfg.get("path")
    prompts = read_jsonl(Path(str(path)).expanduser() if path else BUILTIN)
    cats = data_cfg.get("categories")
    if cats:
        cats = [cats] if isinstance(cats, str) else list(cats)
        known = sorted({p.category for p in prompts})
        unknown = [c for c in cats if c not in known]
        if unknown:
            raise UserError(f"data.categories: no prompts in {', '.join(unknown)}; "
                            f"categories here: {', '.join(known)}")
        prompts = [p for p in prompts if p.category in cats]
    per_cat = data_cfg.get("per_category")
    if per_cat:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            if seen.get(p.category, 0) < int(per_cat):
                kept.append(p)
                seen[p.category] = seen.get(p.category, 0) + 1
        prompts = kept
    limit = data_cfg.get("limit")
    if limit is not None:
        if int(limit) < 1:
            raise UserError(f"data.limit={limit} must be at least 1")
        prompts = prompts[: int(limit)]
    if not data_cfg.get("multi_turn", False):
        prompts = [Prompt(p.id, p.category, p.turns[:1]) for p in prompts]
    return prompts


def encode(tokenizer, messages: list[dict[str, str]], chat_template: str | bool = "auto") -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's answer."""
    use_chat = chat_template is True or (chat_template in ("auto", None)
                                         and getattr(tokenizer, "chat_template", None))
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.chat_template=true but this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        return list(ids)
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]
