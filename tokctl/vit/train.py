"""`tokctl compress-vit train`: train the embedded default ViT on Fashion-MNIST.

Resumable: a checkpoint (model, optimiser, step, data order) is written atomically every
``checkpoint_every`` steps and on Ctrl-C/SIGTERM; ``resume=RUN_FOLDER`` continues from it in a new
run folder. At the end the model is exported as fp16 safetensors + config.json to
``<run>/model``, the folder layout ``tokctl/vit/weights/fashion-vit`` ships.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokctl.console import console, progress_bar
from tokctl.errors import UserError
from tokctl.lr_schedule import warmup_cosine
from tokctl.runs import atomic_torch_save
from tokctl.vit import default_model, fashion_mnist


def augment(images: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero padding: the background is black) and
    horizontal flips, on a uint8 batch (N, H, W)."""
    n, h, w = images.shape
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        images = torch.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip[:, None, None], images.flip(-1), images)
    return images


@functools.lru_cache(maxsize=1)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def training_batch(step: int, images: torch.Tensor, batch_size: int, seed: int, shift: int,
                   hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices and augmented, normalised images of training step ``step``. The data order is a
    function of (seed, epoch) and the augmentation of (seed, step), so a resumed run sees exactly
    the batches an uninterrupted one would have."""
    epoch, within = divmod(step, len(images) // batch_size)
    idx = _epoch_order(len(images), seed, epoch)[within * batch_size:(within + 1) * batch_size]
    g = torch.Generator().manual_seed(seed * 7_919 + step)
    return idx, fashion_mnist.normalise(augment(images[idx], shift, hflip, g))




@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = fashion_mnist.normalise(images[i:i + batch_size])
        correct += (model(pixel_values=x).logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(images))


def _checkpoint_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"resume={resume}: no checkpoint.pt there; pass a train run folder")
    return path


def run(cfg, run) -> dict:
    tc = cfg.train
    if tc.batch_size < 1 or tc.epochs <= 0:
        raise UserError("train.batch_size and train.epochs must be positive")
    train_x, train_y = fashion_mnist.load("train", cfg.data.root)
    test_x, test_y = fashion_mnist.load("test", cfg.data.test_root)
    model = default_model.build(**cfg.model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(train_x) // tc.batch_size
    total = int(round(tc.epochs * steps_per_epoch))
    step = 0
    if cfg.resume:
        state = torch.load(_checkpoint_path(cfg.resume), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        console.print(f"resumed from {cfg.resume} at step {step}/{total}")
    schedule = warmup_cosine(optimizer, total, tc.warmup_steps, tc.min_lr, start_step=step)
    n_params = sum(p.numel() for p in model.parameters())
    run.update_env(parameters=n_params, steps=total, steps_per_epoch=steps_per_epoch)

    def save_checkpoint() -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "step": step}, run.file("checkpoint.pt"))

    model.train()
    losses: list[float] = []
    started, seen = time.perf_counter(), 0
    try:
        with progress_bar("train", total) as advance:
            advance(step)
            while step < total:
                idx, x = training_batch(step, train_x, tc.batch_size, int(cfg.seed), tc.shift, tc.hflip)
                lr = schedule.get_last_lr()[0]
                logits = model(pixel_values=x).logits
                loss = F.cross_entropy(logits, train_y[idx], label_smoothing=tc.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
                optimizer.step()
                schedule.step()
                step += 1
                seen += len(idx)
                losses.append(loss.item())
                if step % tc.log_every == 0 or step == total:
                    row = {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                           "loss": sum(losses) / len(losses),
                           "images_per_s": seen / (time.perf_counter() - started)}
                    losses = []
                    if step % tc.eval_every == 0 or step == total:
                        row["test_top1_subset"] = evaluate(model, test_x[:tc.eval_subset],
                                                           test_y[:tc.eval_subset])
                    run.append_sample(row)
                    advance(0, info=f"loss {row['loss']:.3f}"
                            + (f" top1 {row['test_top1_subset']:.3f}" if "test_top1_subset" in row else ""))
                if step % tc.checkpoint_every == 0:
                    save_checkpoint()
                advance(1)
    except KeyboardInterrupt:
        save_checkpoint()
        raise
    save_checkpoint()
    top1 = evaluate(model, test_x, test_y)
    export = run.file("model")
    model.eval().to(torch.float16).save_pretrained(export)
    model.float()
    reloaded_top1 = evaluate(default_model.load(export), test_x, test_y)
    console.print(f"test top-1 {top1:.4f} (fp16 export {reloaded_top1:.4f}), model in {export}")
    return {"test_top1": top1, "test_top1_fp16": reloaded_top1, "steps": step,
            "epochs": step / steps_per_epoch, "parameters": n_params,
            "train_images_per_s": seen / max(1e-9, time.perf_counter() - started)}
