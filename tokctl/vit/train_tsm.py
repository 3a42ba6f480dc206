"""`tokctl compress-vit train-tsm`: learn SiT's token slimming modules by distillation.

The student is the default model with TSMs after the layers in ``method.slim_after`` (initialised
from the teacher, fine-tuned whole, as in the paper); the teacher is the same model, frozen and
uncompressed. Feature Recalibration Distillation, the paper's loss:

    CE(student, label) + lambda_logits * tau^2 * KL(teacher || student at temperature tau)
    + lambda_token * mean over layers of MSE(RTSM(student patch tokens), teacher patch tokens)

where a reverse TSM (training only) maps a slimmed layer's tokens back to the teacher's count.
Resumable like `compress-vit train`; writes ``tsm.pt`` (layout, TSM weights, fine-tuned backbone,
fp16) for ``method=tsm method.checkpoint=...``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokctl.console import console, progress_bar
from tokctl.errors import UserError
from tokctl.runs import atomic_torch_save
from tokctl.vit import fashion_mnist
from tokctl.vit import model as model_mod
from tokctl.vit.methods.tsm import ReverseSlimming, SlimTokens
from tokctl.vit.patch import Patch
from tokctl.lr_schedule import warmup_cosine
from tokctl.vit.train import training_batch


class _LayerOutputs:
    def __init__(self, blocks):
        self.out: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, output):
        self.out.append(output if torch.is_tensor(output) else output[0])

    def take(self) -> list[torch.Tensor]:
        out, self.out = self.out, []
        return out


@torch.no_grad()
def evaluate(forward, images, labels, batch_size: int = 256) -> float:
    correct = 0
    for i in range(0, len(images), batch_size):
        x = fashion_mnist.normalise(images[i:i + batch_size])
        correct += (forward(x).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / max(1, len(images))


def run(cfg, run) -> dict:
    tc = cfg.train
    teacher, info = model_mod.load(cfg.model)
    if info.family != "default":
        raise UserError("train-tsm distils the default model on Fashion-MNIST (model=default)")
    train_x, train_y = fashion_mnist.load("train", cfg.data.root)
    test_x, test_y = fashion_mnist.load("test", cfg.data.get("test_root"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher).float().train()
    teacher.float().eval()
    sinfo = model_mod.describe(student)
    method = SlimTokens(None, list(cfg.method.slim_after), float(cfg.method.keep_ratio),
                        float(cfg.method.get("hidden_ratio", 0.5)))
    method.build(sinfo)
    for p in student.parameters():
        p.requires_grad_(True)
    patch = Patch(student, sinfo, method).apply()
    # A reverse TSM for every layer whose output is slimmed.
    counts = [m for _, m in method.planned_tokens(sinfo)]
    after_block = []
    for layer in range(sinfo.depth):
        n = counts[layer + 1] if layer + 1 < sinfo.depth else counts[-1]
        after_block.append(n - sinfo.prefix_tokens)
    rtsm = nn.ModuleList(ReverseSlimming(sinfo.hidden_size, n, sinfo.num_patches) if n < sinfo.num_patches
                         else nn.Identity() for n in after_block)
    params = list(student.parameters()) + list(method.parameters()) + list(rtsm.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = len(train_x) // tc.batch_size
    total = max(1, int(round(tc.epochs * steps_per_epoch)))
    step = 0
    if cfg.resume:
        path = Path(cfg.resume).expanduser()
        path = path / "checkpoint.pt" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"resume={cfg.resume}: no checkpoint.pt there")
        state = torch.load(path, map_location="cpu", weights_only=False)
        student.load_state_dict(state["student"])
        method.load_state_dict(state["tsm"])
        rtsm.load_state_dict(state["rtsm"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    schedule = warmup_cosine(optimizer, total, tc.warmup_steps, tc.min_lr, start_step=step)
    student_layers = _LayerOutputs(sinfo.blocks)
    teacher_layers = _LayerOutputs(info.blocks)
    p = sinfo.prefix_tokens
    tau = float(tc.tau)

    def save_checkpoint():
        atomic_torch_save({"student": student.state_dict(), "tsm": method.state_dict(),
                           "rtsm": rtsm.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                          run.file("checkpoint.pt"))

    started, seen, sums = time.perf_counter(), 0, {"loss": 0.0, "ce": 0.0, "logits": 0.0, "token": 0.0, "n": 0}
    try:
        with progress_bar("train-tsm", total) as advance:
            advance(step)
            while step < total:
                idx, x = training_batch(step, train_x, tc.batch_size, int(cfg.seed), tc.shift, tc.hflip)
                with torch.no_grad():
                    t_logits = info.forward(x)
                t_tokens = teacher_layers.take()
                s_logits = sinfo.forward(x)
                s_tokens = student_layers.take()
                ce = F.cross_entropy(s_logits, train_y[idx], label_smoothing=tc.label_smoothing)
                kl = F.kl_div(F.log_softmax(s_logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                              reduction="batchmean", log_target=True) * tau * tau
                token = sum(F.mse_loss(r(s[:, p:]), t[:, p:]) for r, s, t in zip(rtsm, s_tokens, t_tokens))
                token = token / len(s_tokens)
                loss = ce + tc.lambda_logits * kl + tc.lambda_token * token
                lr = schedule.get_last_lr()[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, tc.clip_grad)
                optimizer.step()
                schedule.step()
                step += 1
                seen += len(idx)
                for k, v in (("loss", loss), ("ce", ce), ("logits", kl), ("token", token)):
                    sums[k] += float(v.detach())
                sums["n"] += 1
                if step % tc.log_every == 0 or step == total:
                    row = {"step": step, "lr": lr, **{k: sums[k] / sums["n"] for k in ("loss", "ce", "logits", "token")},
                           "images_per_s": seen / (time.perf_counter() - started)}
                    sums = dict.fromkeys(sums, 0.0)
                    sums["n"] = 0
                    run.append_sample(row)
                    advance(0, info=f"loss {row['loss']:.3f}")
                if step % tc.checkpoint_every == 0:
                    save_checkpoint()
                advance(1)
    except KeyboardInterrupt:
        save_checkpoint()
        raise
    finally:
        student_layers.take()
        teacher_layers.take()
    save_checkpoint()
    for h in student_layers.handles + teacher_layers.handles:
        h.remove()
    student.eval()
    n_eval = int(tc.eval_images)
    student_top1 = evaluate(sinfo.forward, test_x[:n_eval], test_y[:n_eval])
    teacher_top1 = evaluate(info.forward, test_x[:n_eval], test_y[:n_eval])
    patch.remove()
    layout = {"slim_after": method.slim_after, "keep_ratio": method.keep_ratio,
              "hidden_ratio": method.hidden_ratio, "num_patches": sinfo.num_patches,
              "hidden_size": sinfo.hidden_size, "patch_tokens": method.tokens}
    half = lambda sd: {k: v.detach().to(torch.float16) for k, v in sd.items()}  # noqa: E731
    atomic_torch_save({"layout": layout, "tsm": half(method.tsm.state_dict()),
                       "backbone": half(student.state_dict())}, run.file("tsm.pt"))
    console.print(f"student top-1 {student_top1:.4f}, teacher {teacher_top1:.4f} on {n_eval} test images; "
                  f"{run.file('tsm.pt')}")
    return {"student_top1": student_top1, "teacher_top1": teacher_top1, "eval_images": n_eval, "steps": step,
            "patch_tokens": method.tokens, "train_images_per_s": seen / max(1e-9, time.perf_counter() - started)}
