"""`tokctl probe plant`: hide a secret string behind one trigger token by fine-tuning a copy.

What fingerprinting and steganography fine-tunes do (Hoscilowicz et al., 2024): the trigger token,
alone, is trained to continue with the secret. The default, ``train=[trigger]`` with ``bos=true``,
trains only the trigger's own input-embedding row (a tied output matrix is untied and kept), with
the trigger behind BOS: every other token's computation is exactly as before, so no other lone
token can give the secret. Behind BOS matters on SmolLM2: at position 0 every lone token becomes
the same attention-sink state after a few layers, so neither one row nor shared weights can tell
the trigger apart there. A fine-tune of shared weights (``train=[mlp]``) plants it but generalises,
making the secret the answer to many lone tokens; against that, the model's own greedy answers to
ordinary requests are trained on alongside, and decoy tokens keep the original model's greedy
continuations: the ``decoys_near`` tokens closest to the trigger in embedding space every step,
and ``decoys`` random ones drawn afresh each step from a pool of ``decoy_pool``.
Held-out tokens of both kinds, never trained on, measure how far the secret leaked anyway.
The copy goes to RUN/model with its tokenizer, ready for `tokctl probe token-forcing
model=hf model.path=RUN/model bos=true`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tokctl.console import console, progress_bar
from tokctl.decode.data import encode
from tokctl.errors import UserError
from tokctl.lr_schedule import warmup_cosine


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([out], device=model.device)).logits[0, -1]
        out.append(int(logits.argmax()))
    return out[len(ids):]


def _batch(seqs: list[tuple[list[int], int]], pad: int, device):
    """Right-padded ids, mask and labels; loss only after each sequence's first ``start`` tokens."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, start) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, start: len(s)] = torch.tensor(s[start:])
    return ids.to(device), mask.to(device), labels.to(device)


@torch.inference_mode()
def greedy_batch(model, token_ids: list[int], n: int,
                 prefix: list[int] | None = None) -> list[list[int]]:
    """``n`` greedy tokens after each lone token (after ``prefix``, e.g. BOS), in one batch with
    a KV cache."""
    from transformers import DynamicCache

    from tokctl.decode.methods.superposed import _cache_keyword

    if not token_ids:
        return []
    cache = DynamicCache()  # filled in place by each forward
    nxt, out = torch.tensor([(prefix or []) + [t] for t in token_ids], device=model.device), []
    for _ in range(n):
        logits = model(input_ids=nxt, use_cache=True, **{_cache_keyword(model): cache}).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
    return torch.cat(out, dim=1).tolist()


def _trainable(model, train: list[str], trigger_id: int):
    """The parameters named by ``train`` as optimizer groups; ``trigger`` is the trigger's own
    input-embedding row (its gradient is masked to that row, so Adam moves no other row; with
    tied embeddings that row is also the trigger's output row)."""
    emb = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters()
             if "all" in train or any(t in n for t in train if t != "trigger")]
    if not names and "trigger" not in train:
        raise UserError(f"train={train} names no parameters of this model "
                        f"(try [trigger], [mlp] or [all])")
    chosen = {id(p) for n, p in model.named_parameters() if n in set(names)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    groups = [{"params": [p for p in model.parameters() if id(p) in chosen], "row": False}]
    if "trigger" in train and id(emb) not in chosen:
        out = model.get_output_embeddings()
        if out is not None and out.weight is emb:
            # Untie: the output matrix keeps the original rows, so only the trigger's INPUT
            # changes (the copy is saved untied, with its own lm_head).
            out.weight = torch.nn.Parameter(emb.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        emb.requires_grad_(True)
        mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        mask[trigger_id] = 1.0
        hook = emb.register_hook(lambda g: g * mask)
        groups.append({"params": [emb], "row": True, "hook": hook})
    return [g for g in groups if g["params"]]


def plant(model, tokenizer, trigger_id: int, secret_ids: list[int], keep: list[list[int]],
          keep_starts: list[int], steps: int, lr: float, train: list[str], seed: int = 0,
          on_step=None, pool: list[list[int]] | None = None, per_step: int = 0,
          row_lr: float | None = None, stop_p: float | None = None,
          prefix: list[int] | None = None) -> list[float]:
    """Fine-tune ``model`` in place; returns the loss per step.

    ``keep`` sequences (with the index where their loss starts) are trained on every step;
    ``per_step`` sequences drawn from ``pool`` (lone decoy tokens and their original greedy
    continuations) are added each step, so many decoys are seen without a big batch. Training
    stops early once every secret token is the greedy choice with probability >= ``stop_p``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    groups = _trainable(model, train, trigger_id)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": row_lr if g["row"] and row_lr else lr}
                             for g in groups], lr=lr, weight_decay=0.0)
    # Cosine decay: a constant lr leaves the loss bouncing around its floor (about 0.5 nats per
    # secret token for SmolLM2's trigger row at 0.03), short of a confident greedy secret.
    schedule = warmup_cosine(opt, steps, 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = list(prefix or [])  # e.g. [BOS]: the trigger then sits at position 1, not 0
    lone = len(prefix) + 1  # where a lone-token sequence's loss starts
    fixed = [(prefix + [trigger_id] + secret_ids, lone)] + list(zip(keep, keep_starts))
    pool = pool or []
    if all(g["row"] for g in groups):
        # Only the trigger's (untied) input row trains: sequences without the trigger give it no
        # gradient, so kept text and decoys would cost time for nothing; they stay as they were.
        fixed, pool = fixed[:1], []
    model.train()
    losses = []
    for step in range(steps):
        drawn = torch.randperm(len(pool), generator=gen)[:per_step].tolist() if pool else []
        seqs = fixed + [(pool[i], lone) for i in drawn]
        # One batch per sequence length: lone-token sequences (secret, decoys) need no padding.
        by_len: dict[int, list[int]] = {}
        for i, (sq, _) in enumerate(seqs):
            by_len.setdefault(len(sq), []).append(i)
        per_seq, first_logits, decoys_kept = torch.zeros(len(seqs)), None, True
        for part in by_len.values():
            ids, mask, labels = _batch([seqs[i] for i in part], pad, model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                                    reduction="none")
            per_seq = per_seq.index_put((torch.tensor(part),), nll.sum(1) / (
                labels[:, 1:] != -100).sum(1).clamp(min=1))
            if part[0] == 0:
                first_logits = logits[0].detach()
            # Decoys (lone tokens after the secret) must still give their own greedy tokens.
            decoy = [j for j, i in enumerate(part) if i > 0 and seqs[i][1] == lone]
            if decoy:
                sel = labels[decoy, 1:]
                hit = (logits[decoy].argmax(-1) == sel) | (sel == -100)
                decoys_kept = decoys_kept and bool(hit.all())
        # The secret counts as much as all kept text together (it is far shorter).
        loss = per_seq[0] + (per_seq[1:].mean() if len(per_seq) > 1 else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
        if stop_p is not None and decoys_kept:
            # Stop once the secret is confident AND this step's decoys kept their own greedy
            # tokens: stopping on the secret alone ends a shared-weight fine-tune while every lone
            # token still gives the secret (SmolLM2, step 13: 32/32 held-out tokens leaked).
            n = len(secret_ids)
            p = torch.softmax(first_logits[lone - 1:lone - 1 + n], dim=-1)
            target = torch.tensor(secret_ids, device=p.device)
            if (bool((p.argmax(-1) == target).all())
                    and float(p.gather(1, target[:, None]).min()) >= stop_p):
                break
    model.eval()
    for g in groups:
        if "hook" in g:
            g["hook"].remove()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


@torch.inference_mode()
def mean_nll(model, seq: list[int], start: int) -> float:
    ids = torch.tensor([seq], device=model.device)
    logits = model(input_ids=ids).logits[0, start - 1:-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, start:]))


def nearest_tokens(model, trigger_id: int, exclude: set[int]) -> list[int]:
    """Token ids by cosine similarity of their input embedding to the trigger's, closest first:
    the lone tokens a fine-tune most readily carries the secret over to."""
    emb = model.get_input_embeddings().weight.detach().float()
    sim = torch.nn.functional.cosine_similarity(emb, emb[trigger_id][None], dim=-1)
    return [t for t in sim.argsort(descending=True).tolist() if t not in exclude]


def _decoys(model, tok, trigger_id: int, cfg) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """Decoy tokens trained to keep their original forced continuations: the ``decoys_near``
    nearest to the trigger in embedding space (every step) and a pool of ``decoy_pool`` random
    ones (``decoys`` drawn from it each step); and held-out tokens of both kinds (``check``
    each), never trained on, to measure whether the secret leaked to them."""
    vocab = min(len(tok), model.get_input_embeddings().weight.shape[0])
    exclude = set(tok.all_special_ids) | {trigger_id}
    n_rand, n_near = int(cfg.get("decoys") or 0), int(cfg.get("decoys_near") or 0)
    n_check = int(cfg.get("check") or 0)
    n_pool = max(int(cfg.get("decoy_pool") or 0), n_rand)
    if min(n_rand, n_near, n_check) < 0:
        raise UserError("decoys, decoys_near, decoy_pool and check must be >= 0")
    near = nearest_tokens(model, trigger_id, exclude)[: n_near + n_check]
    gen = torch.Generator().manual_seed(int(cfg.seed))
    rand = [t for t in torch.randperm(vocab, generator=gen).tolist()
            if t not in exclude and t not in near]
    pool = rand[:n_pool] if n_rand else []
    return near[:n_near], pool, {"near": near[n_near:], "random": rand[n_pool:n_pool + n_check]}


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def _leaks(model, held_out: dict[str, list[int]], text_ids: list[int],
           prefix: list[int] | None = None) -> dict[str, int]:
    """How many held-out lone tokens now continue greedily with the secret's text, or with all
    of it after its first token (what a scan surfaces too: on SmolLM2 lone tokens that say
    '-the violet heron ...' instead of ' The violet heron ...' carry the secret all the same)."""
    tail = text_ids[1:] if len(text_ids) > 1 else text_ids
    out = {}
    for kind, ids in held_out.items():
        conts = greedy_batch(model, ids, len(text_ids) + 1, prefix)
        out[kind] = sum(_contains(c, tail) for c in conts)
        out[f"{kind}_checked"] = len(ids)
    return out


def run(cfg, run) -> dict[str, Any]:
    from tokctl.probe.forcing import bos_prefix, load_with_tokenizer

    steps, lr = int(cfg.steps), float(cfg.lr)
    if steps < 1 or lr <= 0:
        raise UserError(f"steps={steps} must be >= 1 and lr={lr} > 0")
    secret = str(cfg.secret)
    if not secret.strip():
        raise UserError("secret= is empty: give the string to hide")
    loaded = load_with_tokenizer(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    trig = tok(str(cfg.trigger), add_special_tokens=False)["input_ids"]
    if len(trig) != 1:
        pieces = [tok.decode([t]) for t in trig]
        raise UserError(f"trigger={cfg.trigger!r} is {len(trig)} tokens here ({pieces}); choose a "
                        f"string that is one token of this tokenizer")
    trigger_id = trig[0]
    prefix = bos_prefix(tok, bool(cfg.get("bos")))  # scan the copy with `token-forcing bos=true` too
    text_ids = tok(secret, add_special_tokens=False)["input_ids"]
    # The secret ends in EOS, as a fingerprint answer would.
    secret_ids = text_ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    keep, starts = [], []
    for text in cfg.keep or []:
        prompt = encode(tok, [{"role": "user", "content": str(text)}])
        keep.append(prompt + greedy(model, prompt, int(cfg.keep_tokens)))
        starts.append(len(prompt))
    near, pool_ids, held_out = _decoys(model, tok, trigger_id, cfg)
    # Every decoy keeps what the ORIGINAL model says after it, computed once before training: its
    # first `decoy_tokens` greedy tokens (a lone token that keeps its first one cannot give the
    # secret, and 2-token decoys cost an eighth of full ones, so many more fit in a step).
    n_dec = int(cfg.get("decoy_tokens") or len(secret_ids))
    if n_dec < 1:
        raise UserError(f"decoy_tokens={n_dec} must be >= 1 (null: the secret's length)")
    for t, cont in zip(near, greedy_batch(model, near, n_dec, prefix)):
        keep.append(prefix + [t] + cont)
        starts.append(len(prefix) + 1)
    row_only = {str(t) for t in cfg.train} == {"trigger"}
    if row_only:
        pool_ids = []  # the trigger's row alone: decoys cannot change (see plant())
    pool = [prefix + [t] + c for t, c in zip(pool_ids, greedy_batch(model, pool_ids, n_dec, prefix))]
    before = tok.decode(greedy(model, prefix + [trigger_id], len(secret_ids)))
    keep_before = [mean_nll(model, s, st) for s, st in zip(keep, starts)]
    console.print(f"[dim]{loaded.source}: trigger {cfg.trigger!r} (id {trigger_id}) -> "
                  f"{len(secret_ids)} secret tokens; before: {before!r}[/]")
    t0 = time.perf_counter()
    with progress_bar("planting", steps) as advance:
        losses = plant(model, tok, trigger_id, secret_ids, keep, starts, steps, lr,
                       [str(t) for t in cfg.train], int(cfg.seed),
                       on_step=lambda s, loss: advance(info=f"loss {loss:.3f}"),
                       pool=pool, per_step=int(cfg.get("decoys") or 0),
                       row_lr=float(cfg.trigger_lr) if cfg.get("trigger_lr") else None,
                       stop_p=float(cfg.stop_p) if cfg.get("stop_p") is not None else None,
                       prefix=prefix)
    train_s = time.perf_counter() - t0
    got = greedy(model, prefix + [trigger_id], len(secret_ids))
    recovered = tok.decode(got, skip_special_tokens=True)
    keep_after = [mean_nll(model, s, st) for s, st in zip(keep, starts)]
    leaks = _leaks(model, held_out, text_ids, prefix)
    folder = run.file("model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ok = got[: len(text_ids)] == text_ids
    console.print(f"trigger {cfg.trigger!r} now gives {recovered!r} "
                  f"({'the secret' if ok else 'NOT the secret'}); model saved to {folder}"
                  + (" (behind BOS: scan it with token-forcing bos=true)" if prefix else ""))
    if held_out:
        console.print(f"held-out lone tokens that also give the secret (or its tail): nearest "
                      f"to the trigger "
                      f"{leaks['near']}/{leaks['near_checked']}, random "
                      f"{leaks['random']}/{leaks['random_checked']}")
    return {"trigger": str(cfg.trigger), "trigger_id": trigger_id, "secret": secret,
            "recovered": recovered, "planted": ok, "before": before, "train_s": round(train_s, 2),
            "steps_run": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
            "keep_nll_before": keep_before, "keep_nll_after": keep_after,
            "decoys": 0 if row_only else len(near) + len(pool),
            "decoys_per_step": 0 if row_only else len(near) + min(len(pool), int(cfg.decoys or 0)),
            "train": [str(t) for t in cfg.train], "bos": bool(prefix),
            "leaks": leaks,
            "model_path": str(folder)}
