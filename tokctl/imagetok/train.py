"""`tokctl tokenize-image train`: train a tokenizer on random crops of photos, on the CPU.

Schedule: an autoencoder warm-up (continuous latents, no quantiser) so the encoder and decoder
learn images before codes are fixed; then quantised training (for VQ, the codebook is
initialised by k-means on the warmed-up encoder outputs). AdamW with a linear warm-up and a
cosine decay. Loss: L1 (and/or L2) plus (1 - SSIM), plus the quantiser's commitment term.

Checkpoints: ``checkpoint.pt`` in the run folder every ``train.checkpoint_every`` steps and on an
interruption, written atomically (an interrupted write never replaces a good checkpoint);
``resume=RUN_DIR`` continues from one in a new run folder. ``tokenizer.pt`` (fp16, no optimiser)
is written at the end: copy it to tokctl/imagetok/weights/ to ship it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tokctl.console import progress_bar
from tokctl.lr_schedule import warmup_cosine
from tokctl.errors import UNREADABLE_FILE, UserError, one_line_error
from tokctl.imagetok.checkpoint import (FORMAT, build_tokenizer, load_tokenizer, save_tokenizer,
                                        tokenizer_config)
from tokctl.imagetok import proxy
from tokctl.imagetok.data import CropSampler, warn_skipped
from tokctl.imagetok.models.base import prefix_budgets
from tokctl.imagetok.losses import psnr_per_image, reconstruction_loss, ssim_per_image
from tokctl.runs import Run, atomic_torch_save


@torch.no_grad()
def validate(model, images: torch.Tensor) -> dict:
    """SSIM and PSNR at each token budget on a fixed batch of training-distribution crops, plus
    codebook usage over those images."""
    model.eval()
    model.quantizer.reset_usage()
    tokens = model.encode(images)
    usage = model.quantizer.usage()
    out = {"usage": usage["usage"], "entropy_bits": usage["entropy_bits"]}
    for n in prefix_budgets(model):
        recon = model.decode(tokens[:, :n])
        out[f"ssim@{n}"] = float(ssim_per_image(recon, images).mean())
        out[f"psnr@{n}"] = float(psnr_per_image(recon, images).mean())
    model.train()
    model.quantizer.reset_usage()
    return out


def _load_resume(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.exists():
        raise UserError(f"resume={path}: no checkpoint.pt there (give a train run folder)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except UNREADABLE_FILE as exc:
        raise UserError(f"resume={path}: unreadable checkpoint ({one_line_error(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "optimizer" not in state:
        raise UserError(f"resume={path}: not a tokctl tokenize-image training checkpoint")
    return state


def _init_weights(model, path: str) -> None:
    """Start from the weights of another run's tokenizer (same architecture), with a fresh
    optimiser and schedule: TiTok's second stage continues its first this way."""
    try:
        model.load_state_dict(load_tokenizer(path).model.state_dict())
    except RuntimeError:
        raise UserError(f"init={path}: that tokenizer's weights do not fit this configuration "
                        f"(give the same tokenizer.* and quantizer.* settings)") from None


def run(cfg, run: Run) -> dict:
    t = cfg.train
    resume = _load_resume(cfg.resume) if cfg.get("resume") else None
    config, proxy_weights = (resume["tokenizer"], None) if resume else \
        proxy.resolve(tokenizer_config(cfg))
    sampler = CropSampler(list(cfg.data.folders), int(config["image_size"]),
                          max_side=int(cfg.data.max_side), seed=int(cfg.seed),
                          grayscale=float(cfg.data.get("grayscale") or 0.0),
                          texture=int(cfg.data.get("texture") or 1))
    warn_skipped(sampler)
    model = build_tokenizer(config)
    if proxy_weights:
        unexpected = model.load_state_dict(proxy_weights, strict=False).unexpected_keys
        assert not unexpected, unexpected
    if cfg.get("init") and not resume:
        _init_weights(model, cfg.init)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.99),
                            weight_decay=t.weight_decay)
    step, images_seen = 0, 0
    if resume:
        model.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        step, images_seen = resume["step"], resume["images_seen"]
        sampler.rng.setstate(resume["sampler_rng"])
        torch.set_rng_state(resume["torch_rng"])
    schedule = warmup_cosine(opt, int(t.steps), int(t.lr_warmup_steps),
                             float(t.lr) * float(t.min_lr_ratio), start_step=step)
    # no pixel loss: TiTok's first stage, the proxy's codes are the only target
    pixels = bool(t.l1 or t.l2 or t.ssim)
    if not pixels and getattr(model, "proxy", None) is None:
        raise UserError("train.l1, train.l2 and train.ssim are all 0: without a pixel loss only "
                        "a tokenizer with a proxy (tokenizer.proxy=vq2d) has a target")
    n_params = sum(p.numel() for p in model.parameters())
    run.update_env(photos=len(sampler.photos), parameters=n_params, resumed_from=cfg.get("resume"),
                   tokenizer=model.name, max_tokens=model.max_tokens,
                   codebook_size=model.codebook_size)
    val_images = CropSampler([], model.image_size, seed=12345,
                             photos=sampler.photos).batch(int(t.val_images))
    model.train()

    def checkpoint() -> None:
        state = {"format": FORMAT, "tokenizer": config,
                 "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
                 "optimizer": opt.state_dict(), "step": step, "images_seen": images_seen,
                 "sampler_rng": sampler.rng.getstate(), "torch_rng": torch.get_rng_state(),
                 "trained": {"steps": step, "images": images_seen}}
        atomic_torch_save(state, run.file("checkpoint.pt"))

    last = {}
    start = time.perf_counter()
    try:
        with progress_bar(f"train {model.name}", int(t.steps)) as advance:
            advance(step)
            while step < t.steps:
                images = sampler.batch(int(t.batch_size))
                quantize = step >= t.ae_warmup_steps
                recon, q = model(images, quantize=quantize, pixels=pixels)
                loss, parts = reconstruction_loss(recon, images, t.l1, t.l2, t.ssim) \
                    if pixels else (images.new_zeros(()), {})
                if q is not None:
                    loss = loss + q.loss
                aux = model.auxiliary_loss()
                if aux is not None:
                    loss = loss + aux
                    parts["proxy"] = float(aux.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                lr = schedule.get_last_lr()[0]
                opt.step()
                schedule.step()
                step += 1
                images_seen += images.shape[0]
                advance(1, info=f"loss {float(loss.detach()):.4f} ssim {parts.get('ssim', 0):.3f}")
                if step % t.log_every == 0 or step == t.steps:
                    row = {"step": step, "loss": float(loss.detach()), "lr": lr,
                           "quantized": quantize, "images_seen": images_seen,
                           "elapsed_s": time.perf_counter() - start, **parts}
                    if step % t.val_every == 0 or step == t.steps:
                        last = validate(model, val_images)
                        row.update(last)
                    run.append_sample(row)
                if step % t.checkpoint_every == 0:
                    checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    checkpoint()
    trained = {"steps": step, "images": images_seen, "command": " ".join(sys.argv),
               "photos": len(sampler.photos)}
    save_tokenizer(run.file("tokenizer.pt"), model.eval(), config, trained)
    elapsed = time.perf_counter() - start
    return {"steps": step, "images_seen": images_seen, "parameters": n_params,
            "train_images_per_s": (images_seen - (resume["images_seen"] if resume else 0)) / elapsed,
            "photos": len(sampler.photos), "images_skipped": len(sampler.skipped),
            **{f"val_{k}": v for k, v in last.items()}}
