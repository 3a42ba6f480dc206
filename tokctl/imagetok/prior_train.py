"""`tokctl tokenize-image prior train`: the token prior (prior.py) for one tokenizer, trained on
the tokens of random training crops (the same photos and crops as tokenizer training).

First the tokens: ``data.crops`` crops are encoded once by the tokenizer and kept in the run
folder (``tokens.pt``, with ``data.val_crops`` more from another seed for validation); then the
prior learns them by next-token cross-entropy (AdamW, warm-up then cosine). ``checkpoint.pt``
every ``train.checkpoint_every`` steps and on an interruption; ``resume=RUN_DIR`` continues in a
new run folder from its checkpoint and tokens. ``prior.pt`` (fp16) is written at the end: copy it
to tokctl/imagetok/weights/NAME.prior.pt to ship it.

``prior.conditions=N`` trains a cluster-conditional prior (clusters.py): the training crops are
clustered by colour layout (k-means, N clusters), each sequence starts with its cluster's id, and
a share ``train.condition_dropout`` of them starts with BOS instead, so the same prior also
samples (and codes) unconditionally.

``prior.kind=digits`` trains a DigitPrior (digit_prior.py) instead, for a 2D grid tokenizer whose
ids are too many for a softmax (vq2d32); ``data.refine_steps=N`` takes the crops' tokens from
latents refined N steps, the ids that files encoded with ``--refine`` hold.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tokctl.console import progress_bar
from tokctl.errors import UserError
from tokctl.imagetok.checkpoint import load_tokenizer
from tokctl.imagetok.clusters import colour_layout, kmeans, nearest
from tokctl.imagetok.data import CropSampler, warn_skipped
from tokctl.imagetok.prior import FORMAT, build_prior, save_prior
from tokctl.imagetok.refine import check_refine_steps, refine_latents
from tokctl.imagetok.tokfile import bits_for
from tokctl.runs import Run, atomic_torch_save


def _lr(step: int, t) -> float:
    if step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    frac = min(1.0, (step - t.lr_warmup_steps) / max(1, t.steps - t.lr_warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def crop_tokens(tok, sampler: CropSampler, n: int, advance=None, batch: int = 64,
                refine_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, max_tokens), colour layouts (n, clusters.FEATURES)) of ``n`` random crops:
    the encoder's, or with ``refine_steps`` those of latents refined as `encode --refine` does
    (the tokens a prior for refined files must code)."""
    out, layouts = [], []
    model = tok.model
    while sum(len(o) for o in out) < n:
        images = sampler.batch(min(batch, n - sum(len(o) for o in out)))
        if refine_steps:
            latents = refine_latents(model, images, model.encode_latents(images),
                                     model.num_latents, refine_steps)
            out.append(model.quantizer(latents).ids.reshape(len(images), -1))
        else:
            out.append(model.encode(images))
        layouts.append(colour_layout(images))
        if advance:
            advance(len(images))
    ids = torch.cat(out).to(torch.int16 if tok.model.codebook_size < 2 ** 15 else torch.int64)
    return ids, torch.cat(layouts)


#: The most ids a prior over ids models with a softmax; larger codebooks need prior.kind=digits.
MAX_ID_VOCAB = 1 << 16


def _model_config(model, prior_cfg) -> dict:
    """The prior's config for this tokenizer: a transformer over its ids (``prior.kind=ids``),
    or an MLP context model over the FSQ digits of its 2D grid (``digits``); else one line."""
    given = OmegaConf.to_container(prior_cfg, resolve=True)
    kind = given.pop("kind", "ids") or "ids"
    hidden = given.pop("hidden", 96)
    if kind == "digits":
        from tokctl.imagetok.models import VQ2D

        if not isinstance(model, VQ2D) or not hasattr(model.quantizer, "levels_list"):
            raise UserError("prior.kind=digits models the FSQ digits of a 2D grid tokenizer (vq2d "
                            "with FSQ); this tokenizer is not one: use prior.kind=ids")
        if given.get("conditions"):
            raise UserError("prior.conditions: a digits prior has no cluster-conditional variant "
                            "(leave prior.conditions=0)")
        return {"kind": "digits", "levels": list(model.quantizer.levels_list),
                "grid": int(model.grid), "hidden": int(hidden)}
    if kind != "ids":
        raise UserError(f"prior.kind={kind}: give ids (a transformer over the code ids) or digits "
                        f"(an MLP over the FSQ digits of a 2D grid tokenizer)")
    if model.codebook_size > MAX_ID_VOCAB:
        raise UserError(f"prior.kind=ids: {model.codebook_size} ids are too many for a softmax "
                        f"over them; give prior.kind=digits")
    return {"vocab": model.codebook_size, "max_tokens": model.max_tokens, **given}


def _load_checkpoint(path: str) -> dict:
    p = Path(path)
    p = p / "checkpoint.pt" if p.is_dir() else p
    if not p.exists():
        raise UserError(f"resume={path}: no checkpoint.pt there (give a prior train run folder)")
    state = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT or "optimizer" not in state:
        raise UserError(f"resume={path}: not a tokctl prior training checkpoint")
    return state


def run(cfg, run: Run) -> dict:
    t = cfg.train
    resume = _load_checkpoint(cfg.resume) if cfg.get("resume") else None
    tok = load_tokenizer(resume["tokenizer_path"] if resume else cfg.tokenizer_path)
    if resume and tok.hash != resume["tokenizer_hash"]:
        raise UserError(f"resume={cfg.resume}: its tokenizer {resume['tokenizer_path']} has "
                        f"changed since (hash {tok.hash:06x}, was {resume['tokenizer_hash']:06x})")
    model_cfg = resume["prior"] if resume else _model_config(tok.model, cfg.prior)
    conditions = int(model_cfg.get("conditions") or 0)  # ranges checked by the config's #: marks
    dropout = float(t.get("condition_dropout", 0.1))
    prior = build_prior(model_cfg)
    if resume:
        train_tokens, val_tokens = resume["train_tokens"], resume["val_tokens"]
        train_labels, val_labels = resume.get("train_labels"), resume.get("val_labels")
    else:
        size = tok.model.image_size
        sampler = CropSampler(list(cfg.data.folders), size, max_side=int(cfg.data.max_side),
                              seed=int(cfg.seed), grayscale=float(cfg.data.get("grayscale") or 0),
                              texture=int(cfg.data.get("texture") or 1))
        warn_skipped(sampler)
        val_sampler = CropSampler([], size, seed=12345, photos=sampler.photos)
        n, nv = int(cfg.data.crops), int(cfg.data.val_crops)
        steps = check_refine_steps(cfg.data.get("refine_steps") or 0, "data.refine_steps")
        batch = 16 if steps else 64  # refining takes seconds a crop: a bar that moves
        with progress_bar("tokens of training crops" + (" (refined)" if steps else ""),
                          n + nv) as advance:
            train_tokens, train_layouts = crop_tokens(tok, sampler, n, advance, batch, steps)
            val_tokens, val_layouts = crop_tokens(tok, val_sampler, nv, advance, batch, steps)
        run.update_env(photos=len(sampler.photos), images_skipped=len(sampler.skipped))
        train_labels = val_labels = None
        if conditions:
            try:
                prior.centroids.copy_(kmeans(train_layouts, conditions,
                                             torch.Generator().manual_seed(int(cfg.seed))))
            except ValueError as e:
                raise UserError(f"prior.conditions={conditions}: {e}") from None
            train_labels = nearest(train_layouts, prior.centroids)
            val_labels = nearest(val_layouts, prior.centroids)
            prior.cluster_share.copy_(torch.bincount(train_labels, minlength=conditions)
                                      / len(train_labels))
    opt = torch.optim.AdamW(prior.parameters(), lr=t.lr, betas=(0.9, 0.98),
                            weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    step = 0
    if resume:
        prior.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        step = resume["step"]
        gen.set_state(resume["generator"])
    raw_bits = bits_for(tok.model.codebook_size)
    n_params = sum(p.numel() for p in prior.parameters())
    run.update_env(tokenizer=str(tok.path), tokenizer_hash=f"{tok.hash:06x}", parameters=n_params,
                   train_crops=len(train_tokens), val_crops=len(val_tokens),
                   resumed_from=cfg.get("resume"))

    def checkpoint() -> None:
        atomic_torch_save({"format": FORMAT, "prior": model_cfg, "state_dict": prior.state_dict(),
                           "optimizer": opt.state_dict(), "step": step,
                           "generator": gen.get_state(), "tokenizer_path": str(tok.path),
                           "tokenizer_hash": tok.hash, "train_tokens": train_tokens,
                           "val_tokens": val_tokens, "train_labels": train_labels,
                           "val_labels": val_labels}, run.file("checkpoint.pt"))

    def starts(labels: torch.Tensor | None, drop: float = 0.0) -> torch.Tensor | None:
        """Each sequence's first id: its cluster's, or BOS for a share ``drop`` of them."""
        if labels is None:
            return None
        ids = labels + prior.vocab + 1
        if drop:
            ids = torch.where(torch.rand(len(ids), generator=gen) < drop, prior.vocab, ids)
        return ids

    @torch.no_grad()
    def validate() -> dict:
        prior.eval()
        def bits(labels):
            return torch.stack([prior.loss_bits(val_tokens[i:i + 256].long(),
                                                None if labels is None else starts(labels[i:i + 256]))
                                for i in range(0, len(val_tokens), 256)]).mean(0)

        plain = bits(None)
        out = {"val_bits_per_token": float(plain.mean()), "raw_bits_per_token": raw_bits}
        for n in (8, 16, 32, 64, 128):
            if n <= len(plain):
                out[f"val_bits@{n}"] = float(plain[:n].mean())
        if val_labels is not None:  # given each crop's cluster
            out["val_bits_per_token_conditional"] = float(bits(val_labels).mean())
        prior.train()
        return out

    if not resume:  # the tokens cost minutes: a checkpoint keeps them from the start
        checkpoint()
    last: dict = {}
    start = time.perf_counter()
    prior.train()
    try:
        with progress_bar("train token prior", int(t.steps)) as advance:
            advance(step)
            while step < t.steps:
                for g in opt.param_groups:
                    g["lr"] = _lr(step, t)
                idx = torch.randint(len(train_tokens), (int(t.batch_size),), generator=gen)
                loss = prior.loss_bits(train_tokens[idx].long(),
                                       starts(None if train_labels is None else train_labels[idx],
                                              dropout)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(prior.parameters(), t.grad_clip)
                opt.step()
                step += 1
                advance(1, info=f"{float(loss.detach()):.3f} bits/token")
                if step % t.log_every == 0 or step == t.steps:
                    row = {"step": step, "train_bits_per_token": float(loss.detach()),
                           "lr": opt.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - start}
                    if step % t.val_every == 0 or step == t.steps:
                        last = validate()
                        row.update(last)
                    run.append_sample(row)
                if step % t.checkpoint_every == 0:
                    checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    checkpoint()
    last = last or validate()
    save_prior(run.file("prior.pt"), prior.eval(), model_cfg, tok.hash,
               {"steps": step, "train_crops": len(train_tokens), "command": " ".join(sys.argv)})
    return {"steps": step, "parameters": n_params, "tokenizer_hash": f"{tok.hash:06x}",
            "train_crops": len(train_tokens), **last}
