"""`tokctl decode train-adapter`: Kangaroo's adapter by self-distillation, on a CPU.

1. Corpus: the model's own sampled answers to generic requests (the config's ``seeds``, as
   build-ngram's: no evaluation prompt is read), or text files.
2. One pass of the full model over it, cached in the run folder (``cache.pt``): the hidden states
   after the first ``exit_layer`` layers (the adapter's input) and the final normalised hidden
   states (the teacher: its head gives the next-token distribution). Each training step then
   runs only the adapter and the head.
3. Loss: KL(teacher || draft) of the next-token distributions plus ``hidden_weight`` times the
   smooth-L1 distance of the adapter's features to the teacher's (the head reads both).
   AdamW, warm-up then cosine, checkpoints every ``checkpoint_every`` steps and on Ctrl-C;
   ``resume=RUN`` continues from a run folder (its cache and checkpoint).
4. Held-out sequences score the draft as the decoder will use it: top-1 agreement with the full
   model (the first draft token's acceptance when greedy) and sum(min(p, q)) (its acceptance when
   sampling), against the plain early exit at the same depth (no adapter).

RUN/adapter.safetensors (fp16, with the model's fingerprint) is what method.adapter= takes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokctl.console import console, progress_bar
from tokctl.decode import kangaroo as kg
from tokctl.errors import UserError
from tokctl.lr_schedule import warmup_cosine
from tokctl.runs import atomic_torch_save


@torch.inference_mode()
def hidden_cache(model, sequences: list[list[int]], exit_layer: int, max_len: int) -> dict:
    """The exit's and the final (normalised) hidden states of every sequence, fp32 on the CPU."""
    early, final, ids = [], [], []
    with progress_bar("caching the full model's hidden states", len(sequences)) as advance:
        for seq in sequences:
            seq = seq[:max_len]
            if len(seq) < 2:
                advance(1)
                continue
            x = torch.tensor([seq], device=model.device)
            out = model.model(input_ids=x, output_hidden_states=True)
            hs = out.hidden_states
            early.append(hs[exit_layer][0].float().cpu())
            # last_hidden_state is after the model's final norm: what its head reads.
            final.append(out.last_hidden_state[0].float().cpu())
            ids.append(seq)
            advance(1)
    return {"exit_layer": exit_layer, "ids": ids, "early": early, "final": final}


def _corpus(cfg, loaded) -> list[list[int]]:
    from tokctl.decode.build_ngram import _file_texts, _generated

    source = str(cfg.source)
    if source == "files":
        return [loaded.tokenizer(t)["input_ids"] for t in _file_texts(cfg.files)]
    if source != "generate":
        raise UserError(f"source={source} must be generate or files")
    from omegaconf import OmegaConf

    # build-ngram's generator reads `batch_size`; here that name is the training batch.
    return list(_generated(loaded, OmegaConf.merge(cfg, {"batch_size": cfg.gen_batch_size}),
                           "generating the corpus (the model's own answers)"))


def _reused_corpus(folder, fingerprint: str) -> list[list[int]]:
    """The token ids another train-adapter run generated (its cache.pt): an adapter at another
    exit layer then costs one pass of the model over them, not a new generation."""
    path = Path(str(folder)).expanduser() / "cache.pt"
    if not path.is_file():
        raise UserError(f"corpus_from={folder}: no cache.pt there; pass a train-adapter run folder")
    cache = torch.load(path, weights_only=False)
    if cache.get("fingerprint") != fingerprint:
        raise UserError(f"corpus_from={folder}: that run's corpus is another model's")
    return [list(ids) for ids in cache["ids"]]


def _batch(cache: dict, index: list[int]):
    """Right-padded [B, T, d] inputs and targets with a [B, T] mask of real positions."""
    width = max(cache["early"][i].shape[0] for i in index)
    d = cache["early"][index[0]].shape[1]
    early = torch.zeros(len(index), width, d)
    final = torch.zeros(len(index), width, d)
    mask = torch.zeros(len(index), width, dtype=torch.bool)
    for row, i in enumerate(index):
        n = cache["early"][i].shape[0]
        early[row, :n], final[row, :n], mask[row, :n] = cache["early"][i], cache["final"][i], True
    return early, final, mask


def _rotary(model, width: int):
    with torch.no_grad():
        pos = torch.arange(width)[None]
        cos, sin = model.model.rotary_emb(torch.empty(1), pos)
    return cos[0].float(), sin[0].float()


def _losses(adapter, head_w, early, final, mask, cos, sin, hidden_weight):
    feats = adapter.train_forward(early, cos[: early.shape[1]], sin[: early.shape[1]])[mask]
    teacher = final[mask]
    with torch.no_grad():
        logp_t = F.log_softmax(teacher @ head_w.T, -1)
    logq = F.log_softmax(feats @ head_w.T, -1)
    kl = (logp_t.exp() * (logp_t - logq)).sum(-1).mean()
    hidden = F.smooth_l1_loss(feats, teacher)
    return kl + hidden_weight * hidden, kl, hidden, logp_t, logq


@torch.no_grad()
def evaluate(adapter, model, cache, index, cos, sin, batch_size: int) -> dict[str, float]:
    """Top-1 agreement and sum(min(p, q)) on held-out sequences, for the adapter's draft and for
    the plain early exit (the model's final norm and head on the exit's hidden states)."""
    head_w = model.lm_head.weight.float()
    norm = model.model.norm
    sums = {"top1": 0.0, "accept": 0.0, "top1_no_adapter": 0.0, "accept_no_adapter": 0.0}
    count = 0
    for lo in range(0, len(index), batch_size):
        early, final, mask = _batch(cache, index[lo:lo + batch_size])
        t = early.shape[1]
        p = F.softmax(final[mask] @ head_w.T, -1)
        for key, feats in (("", adapter.train_forward(early, cos[:t], sin[:t])[mask]),
                           ("_no_adapter", norm(early.to(norm.weight.dtype)).float()[mask])):
            q = F.softmax(feats @ head_w.T, -1)
            sums["top1" + key] += (q.argmax(-1) == p.argmax(-1)).sum().item()
            sums["accept" + key] += torch.minimum(p, q).sum(-1).sum().item()
        count += int(mask.sum())
    return {k: v / max(1, count) for k, v in sums.items()}


def _plot(run, curve: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train = [r for r in curve if "loss" in r]
    val = [r for r in curve if "val_top1" in r]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in train], [r["kl"] for r in train], label="KL")
    ax[0].plot([r["step"] for r in train], [r["hidden"] for r in train], label="hidden smooth-L1")
    ax[0].set_xlabel("step"), ax[0].set_yscale("log"), ax[0].legend()
    ax[1].plot([r["step"] for r in val], [r["val_top1"] for r in val], "o-", label="top-1 agreement")
    ax[1].plot([r["step"] for r in val], [r["val_accept"] for r in val], "o-",
               label="sum min(p, q)")
    ax[1].set_xlabel("step"), ax[1].set_ylim(0, 1), ax[1].legend()
    fig.tight_layout()
    fig.savefig(run.file("train_adapter.png"), dpi=110)
    plt.close(fig)


def _resume_dir(resume) -> Path:
    path = Path(str(resume)).expanduser()
    if not (path / "checkpoint.pt").is_file() or not (path / "cache.pt").is_file():
        raise UserError(f"resume={resume}: no checkpoint.pt and cache.pt there; pass a "
                        f"train-adapter run folder")
    return path


def run(cfg, run) -> dict[str, Any]:
    from tokctl.models.loading import load_causal_lm

    steps, bs = int(cfg.steps), int(cfg.batch_size)
    if steps < 1 or bs < 1:
        raise UserError("steps and batch_size must be at least 1")
    resume = _resume_dir(cfg.resume) if cfg.get("resume") else None
    loaded = load_causal_lm(cfg.model)
    model = loaded.model.float().eval().requires_grad_(False)
    exit_layer = int(cfg.exit_layer)
    n_layers = model.config.num_hidden_layers
    if not 1 <= exit_layer < n_layers:
        raise UserError(f"exit_layer={exit_layer}: choose it from 1 to {n_layers - 1} "
                        f"(the model has {n_layers} layers)")
    fingerprint = kg.model_fingerprint(model)
    started = time.perf_counter()
    if resume is not None:
        cache = torch.load(resume / "cache.pt", weights_only=False)
        if cache.get("exit_layer") != exit_layer or cache.get("fingerprint") != fingerprint:
            raise UserError(f"resume={resume}: that run cached another model or exit layer")
        atomic_torch_save(cache, run.file("cache.pt"))
    else:
        seqs = _reused_corpus(cfg.corpus_from, fingerprint) if cfg.get("corpus_from") \
            else _corpus(cfg, loaded)
        cache = hidden_cache(model, seqs, exit_layer, int(cfg.max_len))
        cache["fingerprint"] = fingerprint
        atomic_torch_save(cache, run.file("cache.pt"))
    corpus_s = time.perf_counter() - started
    n = len(cache["ids"])
    if n < 2:
        raise UserError(f"the corpus has {n} usable sequence(s); give more seeds or files")
    g = torch.Generator().manual_seed(int(cfg.seed))
    order = torch.randperm(n, generator=g).tolist()
    n_val = max(1, int(round(n * float(cfg.val_fraction))))
    val_idx, train_idx = order[:n_val], order[n_val:]
    tokens = sum(len(s) for s in cache["ids"])
    console.print(f"{n} sequences, {tokens} tokens ({len(train_idx)} train, {n_val} held out)")

    adapter = kg.KangarooAdapter.for_model(model, exit_layer)
    opt = torch.optim.AdamW(adapter.parameters(), lr=float(cfg.lr), weight_decay=0.0,
                            betas=(0.9, 0.95))
    done, curve, train_s = 0, [], 0.0
    if resume is not None:
        state = torch.load(resume / "checkpoint.pt", weights_only=False)
        adapter.load_state_dict(state["adapter"])
        opt.load_state_dict(state["optimizer"])
        done, curve, train_s = state["step"], state["curve"], state["train_s"]
        console.print(f"resumed from {resume} at step {done}/{steps}")
    schedule = warmup_cosine(opt, steps, int(cfg.warmup_steps), float(cfg.min_lr), start_step=done)
    width = max(e.shape[0] for e in cache["early"])
    cos, sin = _rotary(model, width)
    head_w = model.lm_head.weight.float()
    hw = float(cfg.hidden_weight)
    run.update_env(fingerprint=fingerprint, sequences=n, tokens=tokens, exit_layer=exit_layer)

    def checkpoint() -> None:
        atomic_torch_save({"adapter": adapter.state_dict(), "optimizer": opt.state_dict(),
                           "step": done, "curve": curve, "train_s": train_s},
                          run.file("checkpoint.pt"))

    def validate() -> dict[str, float]:
        adapter.eval()
        v = evaluate(adapter, model, cache, val_idx, cos, sin, bs)
        adapter.train()
        return v

    if done == 0:
        v = validate()
        curve.append({"step": 0, **{f"val_{k}": round(x, 5) for k, x in v.items()}})
        run.append_sample(curve[-1])
    adapter.train()
    seen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    t0 = time.perf_counter()
    window: list[tuple[float, float, float]] = []
    try:
        with progress_bar(f"train-adapter (exit {exit_layer})", steps) as advance:
            advance(done)
            while done < steps:
                # The batch is a function of (seed, step), so a resumed run sees the same ones.
                seen.manual_seed(int(cfg.seed) * 100003 + done)
                pick = torch.randint(len(train_idx), (bs,), generator=seen).tolist()
                early, final, mask = _batch(cache, [train_idx[i] for i in pick])
                loss, kl, hidden, *_ = _losses(adapter, head_w, early, final, mask, cos, sin, hw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), float(cfg.clip_grad))
                opt.step()
                schedule.step()
                done += 1
                window.append((loss.item(), kl.item(), hidden.item()))
                info = f"KL {kl.item():.3f}"
                if done % int(cfg.log_every) == 0 or done == steps:
                    m = [sum(x) / len(window) for x in zip(*window)]
                    row = {"step": done, "loss": round(m[0], 5), "kl": round(m[1], 5),
                           "hidden": round(m[2], 5), "lr": schedule.get_last_lr()[0]}
                    window = []
                    if done % int(cfg.eval_every) == 0 or done == steps:
                        row.update({f"val_{k}": round(x, 5) for k, x in validate().items()})
                        info += f" top-1 {row['val_top1']:.3f}"
                    curve.append(row)
                    run.append_sample(row)
                if done % int(cfg.checkpoint_every) == 0:
                    train_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint()
                advance(1, info=info)
    except KeyboardInterrupt:
        train_s += time.perf_counter() - t0
        checkpoint()
        raise
    train_s += time.perf_counter() - t0
    checkpoint()
    final = curve[-1] if "val_top1" in curve[-1] else {
        "step": done, **{f"val_{k}": round(x, 5) for k, x in validate().items()}}
    path = run.file("adapter.safetensors")
    info = {"steps": done, "sequences": n, "tokens": tokens, "train_s": round(train_s, 1),
            "val_top1": final["val_top1"], "val_top1_no_adapter": final["val_top1_no_adapter"]}
    kg.save_adapter(adapter, path, fingerprint, info)
    _plot(run, curve)
    console.print(f"held-out top-1 agreement with the full model: {final['val_top1']:.3f} "
                  f"(plain exit at layer {exit_layer}: {final['val_top1_no_adapter']:.3f}); "
                  f"use method=kangaroo method.adapter={path}")
    corpus = f"from {cfg.corpus_from}" if cfg.get("corpus_from") else str(cfg.source)
    if resume is not None:
        corpus = f"resumed {resume}"
    return {"exit_layer": exit_layer, "corpus": corpus, "steps": done, "sequences": n,
            "tokens": tokens,
            "corpus_and_cache_s": round(corpus_s, 1), "train_s": round(train_s, 1),
            "adapter": str(path), "model_fingerprint": fingerprint,
            **{k: v for k, v in final.items() if k.startswith("val_")},
            "first_val": {k: v for k, v in curve[0].items() if k.startswith("val_")}}
