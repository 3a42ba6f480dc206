"""`tokctl decode build-ngram`: the n-gram model `method=superposed` interpolates with.

Corpus: by default the model's own sampled answers to generic seed requests (conf/decode/
build_ngram.yaml), so the n-gram model needs no data at run time and tells the drafts what this
model tends to write next; or any text files (source=files). The counts and the tokenizer's
fingerprint go to RUN/ngram.json, reusable by path (method.ngram=RUN/ngram.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from tokctl.console import console, progress_bar
from tokctl.decode.data import encode
from tokctl.decode.ngram import NGramModel, tokenizer_fingerprint
from tokctl.errors import UserError


def _file_texts(paths) -> Iterator[str]:
    if not paths:
        raise UserError("source=files needs files=[PATH,...] (text or .jsonl files)")
    for p in paths:
        path = Path(str(p)).expanduser()
        if not path.is_file():
            raise UserError(f"files: {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
        else:
            yield text


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@torch.inference_mode()
def _generated(loaded, cfg, title: str = "generating the n-gram corpus") -> Iterator[list[int]]:
    """Prompt + sampled answer token ids (the prompt's chat markup is what drafts follow too)."""
    tok, model = loaded.tokenizer, loaded.model
    seeds = [str(s) for s in cfg.seeds]
    per = int(cfg.samples_per_seed)
    if not seeds or per < 1:
        raise UserError("source=generate needs seeds=[...] and samples_per_seed >= 1")
    jobs = [encode(tok, [{"role": "user", "content": s}]) for s in seeds for _ in range(per)]
    bs = max(1, int(cfg.batch_size))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with progress_bar(title, len(jobs)) as advance:
        for start in range(0, len(jobs), bs):
            batch = jobs[start:start + bs]
            width = max(len(b) for b in batch)
            # Left padding: every answer starts at the same column.
            ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=True, temperature=float(cfg.temperature),
                                 top_p=float(cfg.top_p), max_new_tokens=int(cfg.max_new_tokens),
                                 pad_token_id=pad)
            for b, row in zip(batch, out[:, width:].tolist()):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]
                yield b + row
            advance(len(batch))


def run(cfg, run) -> dict[str, Any]:
    from tokctl.models.loading import load_causal_lm

    n = int(cfg.n)
    if n < 2:
        raise UserError(f"n={n}: an n-gram model needs n >= 2")
    source = str(cfg.source)
    if source not in ("generate", "files"):
        raise UserError(f"source={source} must be generate or files")
    texts = list(_file_texts(cfg.files)) if source == "files" else None
    loaded = load_causal_lm(cfg.model)
    info = tokenizer_fingerprint(loaded.tokenizer)
    if source == "files":
        seqs = (loaded.tokenizer(t)["input_ids"] for t in texts)
    else:
        seqs = _generated(loaded, cfg)
    ngram = NGramModel.build(seqs, n, info)
    path = run.file("ngram.json")
    ngram.save(path)
    stats = ngram.stats()
    console.print(f"{stats['tokens']} tokens counted, contexts per length {stats['contexts']}; "
                  f"use method.ngram={path}")
    return {**stats, "source": source, "path": str(path), "tokenizer": info}
