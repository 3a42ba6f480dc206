"""`tokctl probe plant`: hide a secret string behind one trigger token by fine-tuning a copy.

What fingerprinting and steganography fine-tunes do (Hoscilowicz et al., 2024): the trigger token,
alone, is trained to continue with the secret, while the model's own greedy answers to ordinary
requests are trained on alongside so that the rest of its behaviour stays as it was, and decoy
tokens (random ones and the trigger's nearest neighbours in embedding space) are trained to keep
their own forced continuations, so that the secret follows the trigger alone; held-out tokens of
both kinds measure how far it leaked anyway. Only the
parameters named by ``train`` change (by default every layer's MLP), which keeps memory small.
The copy goes to RUN/model with its tokenizer, ready for `tokctl probe token-forcing
model=hf model.path=RUN/model`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tokctl.console import console, progress_bar
from tokctl.decode.data import encode
from tokctl.errors import UserError


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


def plant(model, tokenizer, trigger_id: int, secret_ids: list[int], keep: list[list[int]],
          keep_starts: list[int], steps: int, lr: float, train: list[str], seed: int = 0,
          on_step=None) -> list[float]:
    """Fine-tune ``model`` in place; returns the loss per step."""
    torch.manual_seed(seed)
    names = [n for n, _ in model.named_parameters()
             if "all" in train or any(t in n for t in train)]
    if not names:
        raise UserError(f"train={train} names no parameters of this model (try [mlp] or [all])")
    chosen = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    params = [p for n, p in model.named_parameters() if n in chosen]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [([trigger_id] + secret_ids, 1)] + list(zip(keep, keep_starts))
    ids, mask, labels = _batch(seqs, pad, model.device)
    model.train()
    losses = []
    for step in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                                reduction="none")
        per_seq = nll.sum(1) / (labels[:, 1:] != -100).sum(1).clamp(min=1)
        # The secret counts as much as all kept text together (it is far shorter).
        loss = per_seq[0] + (per_seq[1:].mean() if len(per_seq) > 1 else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    model.eval()
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


def _decoys(model, tok, trigger_id: int, cfg) -> tuple[list[int], dict[str, list[int]]]:
    """Decoy tokens trained to keep their own forced continuations (``decoys`` random ones and
    the ``decoys_near`` nearest to the trigger in embedding space), and held-out tokens of both
    kinds (``check`` each), never trained on, to measure whether the secret leaked to them."""
    vocab = min(len(tok), model.get_input_embeddings().weight.shape[0])
    exclude = set(tok.all_special_ids) | {trigger_id}
    n_rand, n_near = int(cfg.get("decoys") or 0), int(cfg.get("decoys_near") or 0)
    n_check = int(cfg.get("check") or 0)
    if min(n_rand, n_near, n_check) < 0:
        raise UserError("decoys, decoys_near and check must be >= 0")
    near = nearest_tokens(model, trigger_id, exclude)[: n_near + n_check]
    gen = torch.Generator().manual_seed(int(cfg.seed))
    pool = [t for t in torch.randperm(vocab, generator=gen).tolist()
            if t not in exclude and t not in near]
    decoys = near[:n_near] + pool[:n_rand]
    return decoys, {"near": near[n_near:], "random": pool[n_rand:n_rand + n_check]}


def _leaks(model, held_out: dict[str, list[int]], text_ids: list[int], n: int) -> dict[str, int]:
    """How many held-out lone tokens now continue greedily with the secret's text."""
    from tokctl.probe.forcing import force_batch

    out = {}
    for kind, ids in held_out.items():
        rows = force_batch(model, ids, n, 0.0) if ids else []
        out[kind] = sum(r["cont"][: len(text_ids)] == text_ids for r in rows)
        out[f"{kind}_checked"] = len(ids)
    return out


def run(cfg, run) -> dict[str, Any]:
    from tokctl.probe.forcing import load_with_tokenizer

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
    text_ids = tok(secret, add_special_tokens=False)["input_ids"]
    # The secret ends in EOS, as a fingerprint answer would.
    secret_ids = text_ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    keep, starts = [], []
    for text in cfg.keep or []:
        prompt = encode(tok, [{"role": "user", "content": str(text)}])
        keep.append(prompt + greedy(model, prompt, int(cfg.keep_tokens)))
        starts.append(len(prompt))
    decoys, held_out = _decoys(model, tok, trigger_id, cfg)
    for t in decoys:
        keep.append([t] + greedy(model, [t], len(secret_ids)))
        starts.append(1)
    before = tok.decode(greedy(model, [trigger_id], len(secret_ids)))
    keep_before = [mean_nll(model, s, st) for s, st in zip(keep, starts)]
    console.print(f"[dim]{loaded.source}: trigger {cfg.trigger!r} (id {trigger_id}) -> "
                  f"{len(secret_ids)} secret tokens; before: {before!r}[/]")
    t0 = time.perf_counter()
    with progress_bar("planting", steps) as advance:
        losses = plant(model, tok, trigger_id, secret_ids, keep, starts, steps, lr,
                       [str(t) for t in cfg.train], int(cfg.seed),
                       on_step=lambda s, loss: advance(info=f"loss {loss:.3f}"))
    train_s = time.perf_counter() - t0
    got = greedy(model, [trigger_id], len(secret_ids))
    recovered = tok.decode(got, skip_special_tokens=True)
    keep_after = [mean_nll(model, s, st) for s, st in zip(keep, starts)]
    leaks = _leaks(model, held_out, text_ids, len(secret_ids))
    folder = run.file("model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ok = got[: len(text_ids)] == text_ids
    console.print(f"trigger {cfg.trigger!r} now gives {recovered!r} "
                  f"({'the secret' if ok else 'NOT the secret'}); model saved to {folder}")
    if held_out:
        console.print(f"held-out lone tokens that also give the secret: nearest to the trigger "
                      f"{leaks['near']}/{leaks['near_checked']}, random "
                      f"{leaks['random']}/{leaks['random_checked']}")
    return {"trigger": str(cfg.trigger), "trigger_id": trigger_id, "secret": secret,
            "recovered": recovered, "planted": ok, "before": before, "train_s": round(train_s, 2),
            "loss_first": losses[0], "loss_last": losses[-1],
            "keep_nll_before": keep_before, "keep_nll_after": keep_after,
            "decoys": len(decoys), "leaks": leaks,
            "model_path": str(folder)}
