"""Prompt sets for `tokctl decode`, read through the `datasets` library: the built-in set, a
local JSON or JSON-lines file (Spec-Bench's question.jsonl, plain {"prompt": ...} lines), a folder
written by ``save_to_disk``, or a hub dataset already in the local Hugging Face cache (offline).

Columns: ``data.field`` holds the prompt (a string, or a list of turns; by default ``turns`` as in
Spec-Bench, else ``prompt``), ``data.category_field`` the category (default ``category``; "all"
without one), ``question_id`` or ``id`` the id. Every problem with the data is found before any
model is loaded and reported as one line that names the file and the line (or row).
"""

from __future__ import annotations


import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from tokctl.errors import UserError, one_line_error

BUILTIN = Path(__file__).parent / "prompts" / "builtin.jsonl"
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass
class Prompt:
    id: str
    category: str
    turns: list[str]
    answer: str | None = None  # what a correct output contains (data=passkey's key)
    reference: str | None = None  # the true continuation of a cut prompt (data=cut)
    match_bytes: int = 0  # how many of its bytes exact match compares


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    # its own error log lines would repeat, as a traceback, what tokctl says in one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _json_file(path: Path):
    """A local JSON / JSON-lines file, through datasets' json builder (its Arrow cache under
    tokctl's cache folder). When the builder refuses the file, the line at fault is named."""
    from tokctl.models.loading import cache_dir

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not text.strip():
        raise UserError(f"{path} holds no prompts")
    datasets = _datasets()
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train",
                                     cache_dir=str(cache_dir() / "datasets"))
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as exc:
        _first_bad_line(path, text)
        cause = exc.__cause__ or exc
        raise UserError(f"{path}: datasets cannot read it as JSON ({one_line_error(cause)})") from None


def _first_bad_line(path: Path, text: str) -> None:
    """Raise UserError naming the first line that is not a JSON object (JSON-lines files)."""
    if text.lstrip().startswith("["):  # one JSON array, not JSON lines
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line")


def _line_numbers(path: Path) -> Callable[[int], str]:
    """Row index -> "file:line" for a JSON-lines file (blank lines hold no row)."""
    lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    if path.read_text(encoding="utf-8").lstrip().startswith("["):
        return lambda i: f"{path} row {i}"
    return lambda i: f"{path}:{lines[i]}" if i < len(lines) else f"{path} row {i}"


def _pick_split(ds, split: str | None, where: str):
    datasets = _datasets()
    if isinstance(ds, (datasets.DatasetDict, dict)):
        names = list(ds)
        if split is None:
            split = "test" if "test" in names else names[0] if names else None
        if split not in names:
            raise UserError(f"data.split={split}: {where} has the splits {', '.join(names)}")
        return ds[split]
    if split is not None and str(ds.split) != split:
        raise UserError(f"data.split={split}: {where} holds one split ({ds.split}); "
                        f"leave data.split unset")
    return ds


def open_dataset(path_value: str | None, split: str | None):
    """The prompt rows (a datasets.Dataset) and a function naming row i for messages."""
    if not path_value:
        return _json_file(BUILTIN), _line_numbers(BUILTIN)
    raw = str(path_value)
    path = Path(raw).expanduser()
    if path.is_file():
        if split not in (None, "train"):
            raise UserError(f"data.split={split}: a single file has one split, 'train'")
        return _json_file(path), _line_numbers(path)
    if path.is_dir():
        if not any((path / m).is_file() for m in SAVED_MARKERS):
            raise UserError(f"data.path={raw} is a folder but not one written by datasets' "
                            f"save_to_disk; give a .jsonl file, such a folder or a hub id")
        datasets = _datasets()
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as exc:
            raise UserError(f"could not read the saved dataset at {path}: "
                            f"{one_line_error(exc)}") from None
        return _pick_split(ds, split, str(path)), (lambda i: f"{path} row {i}")
    looks_like_file = raw.startswith(("/", ".", "~")) or path.suffix in (".json", ".jsonl")
    if looks_like_file or raw.count("/") != 1:
        raise UserError(f"data file {raw} does not exist (set data.path=FILE, a save_to_disk "
                        f"folder, or a hub id in the local Hugging Face cache)")
    return _hub_dataset(raw, split), (lambda i: f"{raw} row {i}")


def _hub_dataset(hub_id: str, split: str | None):
    """A hub dataset from the local Hugging Face cache only: tokctl never downloads at run time."""
    from unittest import mock

    datasets = _datasets()
    try:
        with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
            ds = datasets.load_dataset(hub_id)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise UserError(f"data.path={hub_id}: not a local file or folder, and not in the local "
                        f"Hugging Face cache ({one_line_error(exc)}); download it elsewhere "
                        f"and save_to_disk, or give a .jsonl file") from None
    return _pick_split(ds, split, hub_id)


def _prompt_column(ds, field: str | None, where: str) -> str:
    columns = list(ds.column_names)
    if field:
        if field not in columns:
            raise UserError(f"data.field={field}: no such column in {where} "
                            f"(columns: {', '.join(columns)})")
        return field
    for name in ("turns", "prompt"):
        if name in columns:
            return name
    raise UserError(f"{where}: needs 'turns' (Spec-Bench) or 'prompt', or data.field=COLUMN "
                    f"(columns: {', '.join(columns)})")


def rows_to_prompts(ds, data_cfg, where: Callable[[int], str], source: str) -> list[Prompt]:
    if len(ds) == 0:
        raise UserError(f"{source} holds no prompts")
    field = _prompt_column(ds, data_cfg.get("field"), source)
    cat_field = data_cfg.get("category_field")
    if cat_field and cat_field not in ds.column_names:
        raise UserError(f"data.category_field={cat_field}: no such column in {source} "
                        f"(columns: {', '.join(ds.column_names)})")
    cat_field = cat_field or ("category" if "category" in ds.column_names else None)
    id_field = next((c for c in ("question_id", "id") if c in ds.column_names), None)
    texts = ds[field]
    if not data_cfg.get("field") and field == "turns" and "prompt" in ds.column_names:
        # a file that mixes Spec-Bench questions and {"prompt": ...} lines
        texts = [t if t is not None else p for t, p in zip(texts, ds["prompt"])]
    cats = ds[cat_field] if cat_field else [None] * len(ds)
    ids = ds[id_field] if id_field else [None] * len(ds)
    prompts = []
    for i, (value, cat, qid) in enumerate(zip(texts, cats, ids)):
        if isinstance(value, str):
            turns = [value]
        elif (isinstance(value, list) and value and all(isinstance(t, str) for t in value)):
            turns = list(value)
        elif value is None:
            raise UserError(f"{where(i)}: no '{field}' (needs 'turns' (Spec-Bench) or 'prompt')")
        else:
            raise UserError(f"{where(i)}: '{field}' must be a string or a non-empty list of strings")
        if any(not t.strip() for t in turns):
            raise UserError(f"{where(i)}: empty prompt")
        prompts.append(Prompt(id=str(i if qid is None else qid), category=str(cat or "all"),
                              turns=turns))
    return prompts


def load_prompts(data_cfg) -> list[Prompt]:
    if str(data_cfg.get("name")) in ("passkey", "long"):
        raise UserError(f"data={data_cfg.name} is sized in the model's tokens: `tokctl decode` "
                        f"builds it, this command does not take it")
    path = data_cfg.get("path")
    ds, where = open_dataset(path, data_cfg.get("split"))
    prompts = rows_to_prompts(ds, data_cfg, where, str(path or BUILTIN))
    cats = data_cfg.get("categories")
    if cats:
        cats = [cats] if isinstance(cats, str) else list(cats)
        known = sorted({p.category for p in prompts})
        unknown = [c for c in cats if c not in known]
        if unknown:
            raise UserError(f"data.categories: no prompts in {', '.join(unknown)}; "
                            f"categories here: {', '.join(known)}")
        prompts = [p for p in prompts if p.category in cats]
    if data_cfg.get("cut"):
        from tokctl.decode.cut import cut_prompts

        prompts = cut_prompts(prompts, data_cfg)
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
        prompts = [replace(p, turns=p.turns[:1]) for p in prompts]
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
