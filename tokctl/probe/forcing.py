"""`tokctl probe token-forcing`: Unconditional Token Forcing (Hoscilowicz et al., 2024).

Every vocabulary token is fed alone (no prompt, no chat template) and decoded greedily for a few
steps. Text a fine-tune has planted behind a trigger (a fingerprint, a hidden message) comes out
with abnormally high probabilities at every step, so tokens are ranked by how long and confident
their forced continuation is:

    score(token) = sum of p_i over the leading steps with p_i >= threshold, counting only steps
                   whose greedy token is new to the continuation

(a continuation that loops on one token, "\\n\\n\\n...", scores at most about 1). A token's
continuation is followed only while it stays confident, so the batch shrinks fast: the scan costs
little more than one forward pass per vocabulary token. Batches of token ids are appended to
RUN/scan.jsonl as they finish; `resume=RUN` reuses an interrupted scan's finished batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tokctl.console import console, progress_bar
from tokctl.decode.ngram import tokenizer_fingerprint
from tokctl.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_has_tokenizer(model_cfg) -> None:
    """A model folder saved without its tokenizer cannot name the tokens it is forced with."""
    path = model_cfg.get("path")
    if path and Path(str(path)).expanduser().is_dir():
        folder = Path(str(path)).expanduser()
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"model.path={path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                            f"token forcing needs one to name tokens; save the tokenizer of the "
                            f"model it came from into that folder")


def bos_prefix(tok, bos: bool) -> list[int]:
    """What goes before a lone token: ``[BOS]`` with ``bos=true`` (the token then sits at position
    1, where a model's states are its own rather than the attention sink's), else nothing."""
    if not bos:
        return []
    if tok.bos_token_id is None:
        raise UserError("bos=true but this tokenizer has no BOS token")
    return [tok.bos_token_id]


def load_with_tokenizer(model_cfg):
    from tokctl.models.loading import load_causal_lm

    check_has_tokenizer(model_cfg)
    try:
        loaded = load_causal_lm(model_cfg)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"could not load the model and its tokenizer: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if loaded.tokenizer is None:
        raise UserError("this model has no tokenizer: token forcing needs one to name tokens")
    return loaded


@torch.inference_mode()
def force_batch(model, token_ids: list[int], steps: int, threshold: float,
                prefix: list[int] | None = None, eos_ids=frozenset()) -> list[dict[str, Any]]:
    """Greedy-decode each token alone; rows leave the batch at their first unconfident step."""
    device = model.device
    prefix = prefix or []
    seqs = torch.tensor([prefix + [t] for t in token_ids], device=device)
    rows = [{"id": int(t), "probs": [], "cont": [], "run": 0, "score": 0.0} for t in token_ids]
    alive = list(range(len(token_ids)))
    for _ in range(steps):
        if not alive:
            break
        logits = model(input_ids=seqs).logits[:, -1].float()
        p, nxt = torch.softmax(logits, dim=-1).max(dim=-1)
        keep = []
        for j, r in enumerate(alive):
            row, pj, tj = rows[r], float(p[j]), int(nxt[j])
            row["probs"].append(round(pj, 4))
            if pj < threshold or tj in eos_ids:
                continue  # the confident run ends here
            if tj not in row["cont"]:
                row["score"] += pj
            row["cont"].append(tj)
            row["run"] += 1
            keep.append(j)
        alive = [alive[j] for j in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=device)
        seqs = torch.cat([seqs[idx], nxt[idx, None]], dim=1)
    for row in rows:
        run = row["probs"][: row["run"]]
        row["mean_p"] = round(sum(run) / len(run), 4) if run else 0.0
        row["score"] = round(row["score"], 4)
    return rows


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["score"], r["mean_p"], r["probs"][0] if r["probs"] else 0),
                  reverse=True)


def _read_scan(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by an interruption: that batch is scanned again
    return rows


def _resume_rows(resume: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    old = Path(str(resume)).expanduser()
    scan, old_info = old / "scan.jsonl", old / "scan_info.json"
    if not scan.is_file() or not old_info.is_file():
        raise UserError(f"resume={resume}: no scan.jsonl / scan_info.json there (give the run "
                        f"folder of an earlier token-forcing scan)")
    theirs = json.loads(old_info.read_text())
    for key in ("tokenizer", "steps", "threshold", "bos", "model_source", "dtype"):
        if theirs.get(key) != info.get(key):
            raise UserError(f"resume={resume}: that scan used another {key} "
                            f"({theirs.get(key)!r}, here {info.get(key)!r})")
    return _read_scan(scan)


def run(cfg, run) -> dict[str, Any]:
    steps, threshold, bs = int(cfg.steps), float(cfg.threshold), int(cfg.batch_size)
    if steps < 1 or bs < 1 or not 0 < threshold <= 1:
        raise UserError(f"steps={steps} and batch_size={bs} must be >= 1, threshold={threshold} "
                        f"in (0, 1]")
    loaded = load_with_tokenizer(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    vocab = min(len(tok), model.get_input_embeddings().weight.shape[0])
    first = int(cfg.get("start") or 0)
    if not 0 <= first < vocab:
        raise UserError(f"start={first} must be a token id in [0, {vocab})")
    last = min(vocab, first + int(cfg.limit)) if cfg.get("limit") else vocab
    prefix = bos_prefix(tok, bool(cfg.get("bos")))
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    info = {"tokenizer": tokenizer_fingerprint(tok), "steps": steps, "threshold": threshold,
            "bos": bool(prefix), "model_source": loaded.source, "dtype": loaded.info["dtype"],
            "vocab": vocab, "ids": [first, last]}
    rows = _resume_rows(cfg.resume, info) if cfg.get("resume") else []
    done = {r["id"] for r in rows}
    run.write_json("scan_info.json", info)
    scan_path = run.file("scan.jsonl")
    with scan_path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    todo = [t for t in range(first, last) if t not in done]
    console.print(f"[dim]{loaded.source}: ids {first}..{last - 1} of {vocab}, "
                  f"{len(done)} already scanned, "
                  f"{steps} steps, threshold {threshold}, {torch.get_num_threads()} threads[/]")
    t0 = time.perf_counter()
    with progress_bar("token forcing", len(todo)) as advance, scan_path.open("a") as f:
        for start in range(0, len(todo), bs):
            batch = force_batch(model, todo[start:start + bs], steps, threshold, prefix, eos)
            f.write("".join(json.dumps(r) + "\n" for r in batch))
            f.flush()  # a finished batch survives an interruption
            rows += batch
            best = max(rows, key=lambda r: r["score"])
            advance(len(batch), info=f"best so far: id {best['id']} ({best['score']:.2f})")
    scan_s = time.perf_counter() - t0
    ranked = rank(rows)
    top = []
    for i, r in enumerate(ranked[: int(cfg.top)], 1):
        top.append({"rank": i, "id": r["id"], "token": tok.decode([r["id"]]),
                    "continuation": tok.decode(r["cont"]), "score": r["score"], "run": r["run"],
                    "mean_p": r["mean_p"]})
    run.write_text("candidates.jsonl", "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in top))
    _print_top(top[: int(cfg.show)])
    return {"vocab": vocab, "ids": [first, last], "scanned": len(rows), "scanned_now": len(todo),
            "scan_s": round(scan_s, 2),
            "tokens_per_s": round(len(todo) / scan_s, 1) if scan_s > 0 else None,
            "steps": steps, "threshold": threshold, "top": top[: int(cfg.show)]}


def _print_top(top) -> None:
    from rich.table import Table

    table = Table(title="tokens whose forced continuation is longest and most confident")
    for c in ("rank", "id", "token", "score", "run", "mean p", "continuation"):
        table.add_column(c, justify="left" if c in ("token", "continuation") else "right",
                         overflow="fold")
    for t in top:
        table.add_row(str(t["rank"]), str(t["id"]), repr(t["token"]), f"{t['score']:.2f}",
                      str(t["run"]), f"{t['mean_p']:.3f}", repr(t["continuation"]))
    console.print(table)
