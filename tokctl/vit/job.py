"""`tokctl compress-vit`: one token-compression method against the uncompressed model, same run.

1. Check the data source (before loading anything), load the model, build the method and patch
   the model (the method checks its settings against the model: r too large, bad layers, ...).
2. Methods that learn on data first (DiffRate's rate search) do it on calibration images kept
   apart from the evaluated ones; what they learn is saved in the run folder.
3. Evaluate batch by batch, the baseline (the same model with the patch disabled) and the
   compressed model interleaved, their order alternating, after ``warmup`` untimed batches.
   One row per batch goes to samples.jsonl as it finishes.
4. On the first ``fidelity_images`` images, an untimed pass that traces which patches each token
   stands for: the patch-feature fidelity and the PNG of merged patches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tokctl import kernels, measure
from tokctl.console import console, progress_bar
from tokctl.errors import UserError
from tokctl.vit import data as data_mod
from tokctl.vit import flops, model as model_mod
from tokctl.vit.patch import Patch, TokenMethod
from tokctl.vit.visualize import merge_title, patch_owner, save_merge_figure


def build_method(method_cfg) -> TokenMethod:
    from tokctl.instantiate import instantiate

    params = OmegaConf.to_container(method_cfg, resolve=True)
    name = params.pop("name", None)
    method = instantiate(params, f"method {name} (conf/compress_vit/method/)")
    if not isinstance(method, TokenMethod):
        raise UserError(f"{params['_target_']} is not a TokenMethod")
    return method


class _LastBlockTokens:
    """Captures the output tokens of the last block (before the final norm) of whatever runs."""

    def __init__(self, block: torch.nn.Module):
        self.tokens = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.tokens = output if torch.is_tensor(output) else output[0]

    def close(self):
        self.handle.remove()


def _split_indices(source, cfg, needs_calibration: bool) -> tuple[list[int], list[int], str]:
    """(evaluated, calibration) image indices, disjoint; and where calibration images come from."""
    n = len(source)
    indices = list(range(n))
    if not needs_calibration:
        limit = cfg.data.get("limit")
        return indices[: int(limit)] if limit else indices, [], ""
    want = int(cfg.calibration.images)
    if want < 1:
        raise UserError("calibration.images must be >= 1")
    if n - want < 1:
        raise UserError(f"calibration.images={want} leaves no image to evaluate of {n}; lower it")
    calib = indices[n - want:]
    evaluated = indices[: n - want]
    limit = cfg.data.get("limit")
    if limit:
        evaluated = evaluated[: int(limit)]
    return evaluated, calib, f"the last {want} images of the data (not evaluated)"


def _calibration_batches(cfg, info, source, calib_indices):
    """Endless shuffled calibration batches: the default dataset's training split when it is
    installed (then no evaluated image is set aside), else the held-out images; where they come
    from (None: the held-out images), and why the training split was not used (None: it was, or
    was not asked for)."""
    from tokctl.vit import fashion_mnist

    batch = int(cfg.method.get("search", {}).get("batch_size", 32))
    g = torch.Generator().manual_seed(int(cfg.seed))
    if cfg.data.kind == "fashion_mnist" and cfg.calibration.get("prefer_train_split", True):
        try:
            images, labels = fashion_mnist.load("train", cfg.data.get("root"))
        except UserError as exc:
            images, missing = None, str(exc)
        if images is not None:
            pool = torch.randperm(len(images), generator=g)[: int(cfg.calibration.images)]
            train_src = data_mod.fashion_mnist_source(OmegaConf.create({"split": "train", "root": cfg.data.get("root")}), info)

            def from_train():
                while True:
                    order = pool[torch.randperm(len(pool), generator=g)].tolist()
                    for b in train_src.batches(batch, order):
                        yield data_mod.to_model_input(b.images, info), b.labels
            return from_train(), f"{len(pool)} images of the Fashion-MNIST training split", None
    else:
        missing = None
    if not calib_indices:
        raise UserError("this method needs calibration images: set calibration.images")

    def held_out():
        while True:
            order = [calib_indices[i] for i in torch.randperm(len(calib_indices), generator=g).tolist()]
            for b in source.batches(batch, order):
                yield data_mod.to_model_input(b.images, info), b.labels
    return held_out(), None, missing


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, p the baseline."""
    p = F.log_softmax(p_logits.float(), -1)
    q = F.log_softmax(q_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def run(cfg, run) -> dict[str, Any]:
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    kernels.reset_counts()
    data_mod.check_early(cfg.data)
    device, dtype = _placement(cfg)
    method = build_method(cfg.method)
    model, info = model_mod.load(cfg.model)
    source = data_mod.open_source(cfg.data, info)
    for note in source.notes:
        console.print(f"[yellow]note[/]: {note}")

    model.to(device=device, dtype=dtype)
    compressed_model = method.prepare_model(model)
    compressed_model.to(device=device, dtype=dtype)
    compressed_info = info if compressed_model is model else model_mod.describe(compressed_model)
    if compressed_model is not model:
        compressed_info.family = info.family
    patch = Patch(compressed_model, compressed_info, method, compile=bool(cfg.get("compile", False))).apply()
    try:
        return _evaluate(cfg, run, method, model, info, compressed_info, patch, source, batch_size)
    finally:
        patch.remove()


def _placement(cfg) -> tuple[torch.device, torch.dtype | None]:
    name = str(cfg.get("device") or "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: no CUDA device here (use device=cpu)")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = cfg.get("dtype")
    if dtype is not None and str(dtype) not in dtypes:
        raise UserError(f"dtype={dtype} is not one of {', '.join(dtypes)} (or null)")
    return device, dtypes.get(str(dtype)) if dtype is not None else None


def _model_input(images: torch.Tensor, info, like: torch.nn.Module) -> torch.Tensor:
    """Normalised images on the model's device and in its dtype."""
    weight = next(like.parameters())
    return data_mod.to_model_input(images, info).to(device=weight.device, dtype=weight.dtype)


def _evaluate(cfg, run, method, model, info, cinfo, patch, source, batch_size) -> dict[str, Any]:
    needs_search = bool(getattr(method, "needs_search", False))
    evaluated, calib, calib_note = _split_indices(source, cfg, needs_search)
    search_info: dict[str, Any] = {}
    if needs_search:
        batches, where, missing = _calibration_batches(cfg, cinfo, source, calib)
        if missing:  # asked for the training split, got held-out images instead: say so
            console.print(f"[yellow]warning[/]: calibrating on held-out images instead of the "
                          f"Fashion-MNIST training split ({missing}); metrics.json: "
                          f"calibration_fallback")
            search_info["calibration_fallback"] = missing
        if where is not None:  # the training split: give the held-out images back to evaluation
            evaluated, _, _ = _split_indices(source, cfg, False)
        calib_note = where or calib_note
        steps = int(cfg.method.get("search", {}).get("steps", 300))
        console.print(f"{method.name}: searching compression rates on {calib_note} ({steps} steps)")
        with progress_bar("rate search", steps) as advance:
            def log(row):
                run.append_sample({"phase": "search", **row})
                advance(1, info=f"FLOPs {row['flops_ratio']:.3f} loss {row['task_loss']:.3f}")
            result = method.search(patch, batches, log=log)
        run.write_json("diffrate_rates.json", {**method.rates(), "target_flops": method.target_flops,
                                               "model_tokens": info.num_tokens, "depth": info.depth,
                                               "calibration": calib_note})
        search_info |= {"search_steps": steps, "calibration": calib_note,
                       "search_final_flops_ratio": result["history"][-1]["flops_ratio"]}
    if not evaluated:
        raise UserError("no images to evaluate (data.limit or calibration.images too large)")

    forward_base, forward_comp = info.forward, cinfo.forward
    separate = patch.model is not model
    capture_base = _LastBlockTokens(info.blocks[-1])
    capture_comp = capture_base if not separate else _LastBlockTokens(cinfo.blocks[-1])

    def baseline(x):
        if separate:
            return forward_base(x)
        with patch.disabled():
            return forward_base(x)

    warmup = int(cfg.warmup)
    totals = {"n": 0, "t": 0.0, "tb": 0.0, "correct": 0, "bcorrect": 0, "labelled": 0, "agree": 0, "kl": 0.0}
    times: dict[str, list[float]] = {"base": [], "comp": []}
    tokens_attn = tokens_mlp = None
    batches = list(range(0, len(evaluated), batch_size))
    with torch.inference_mode(), progress_bar(f"{method.name} vs baseline", len(batches)) as advance:
        if warmup > 0:
            first = next(source.batches(batch_size, evaluated[:batch_size]), None)
            if first is not None:
                x = _model_input(first.images, info, model)
                for _ in range(warmup):
                    baseline(x)
                    forward_comp(x)
        device = next(model.parameters()).device
        for b_index, batch in enumerate(source.batches(batch_size, evaluated)):
            x = _model_input(batch.images, info, model)
            timed = measure.interleaved({"base": lambda: baseline(x), "comp": lambda: forward_comp(x)},
                                        b_index, device)
            seconds = {k: s for k, (s, _) in timed.items()}
            out = {k: o.float().cpu() for k, (_, o) in timed.items()}
            st = patch.last_state
            tokens_attn, tokens_mlp = list(st.tokens_attn), list(st.tokens_mlp)
            pred_b, pred_c = out["base"].argmax(-1), out["comp"].argmax(-1)
            labelled = batch.labels >= 0
            if info.num_labels:
                kl = float(_kl(out["base"], out["comp"]).sum())
            else:  # an encoder without classifier: compare its pooled features instead
                kl = float(F.cosine_similarity(out["base"].float(), out["comp"].float(), dim=-1).sum())
            row = {"batch": b_index, "images": len(x), "seconds": seconds["comp"],
                   "baseline_seconds": seconds["base"], "agree": int((pred_b == pred_c).sum()),
                   "kl" if info.num_labels else "output_cosine": kl}
            if labelled.any():
                row["correct"] = int((pred_c == batch.labels)[labelled].sum())
                row["baseline_correct"] = int((pred_b == batch.labels)[labelled].sum())
                row["labelled"] = int(labelled.sum())
            run.append_sample(row)
            totals["n"] += len(x)
            totals["t"] += seconds["comp"]
            totals["tb"] += seconds["base"]
            totals["agree"] += row["agree"]
            totals["kl"] += kl
            totals["correct"] += row.get("correct", 0)
            totals["bcorrect"] += row.get("baseline_correct", 0)
            totals["labelled"] += row.get("labelled", 0)
            times["base"].append(seconds["base"])
            times["comp"].append(seconds["comp"])
            advance(1, info=f"speedup {totals['tb'] / max(totals['t'], 1e-12):.2f}x")
    if totals["n"] == 0:
        first = next(iter(source.skipped.items()), None)
        raise UserError(f"none of the {len(evaluated)} images could be decoded (first: {first[0]}: {first[1]})"
                        if first else "no images were evaluated")
    fidelity = _fidelity_and_figure(cfg, run, patch, info, cinfo, source, evaluated, baseline,
                                    forward_comp, capture_base, capture_comp)
    capture_base.close()
    if capture_comp is not capture_base:
        capture_comp.close()

    tokens = list(zip(tokens_attn, tokens_mlp))
    full = [(info.num_tokens, info.num_tokens)] * info.depth
    gflops = flops.gflops(info, tokens, method.overhead_macs(info))
    base_gflops = flops.gflops(info, full)
    labelled = totals["labelled"]
    metrics = {
        "method": method.name, "model": info.family, "num_images": totals["n"],
        "images_per_s": totals["n"] / max(totals["t"], 1e-12),
        "baseline_images_per_s": totals["n"] / max(totals["tb"], 1e-12),
        # the baseline's time over the method's (same images), the spread over batches
        **measure.compare(times["base"], times["comp"]),
        "gflops": gflops, "baseline_gflops": base_gflops, "flops_ratio": gflops / base_gflops,
        "top1": totals["correct"] / labelled if labelled else None,
        "baseline_top1": totals["bcorrect"] / labelled if labelled else None,
        # Without a classifier, argmax agreement means nothing: the pooled outputs' cosine instead.
        "agreement": totals["agree"] / totals["n"] if info.num_labels else None,
        "kl": totals["kl"] / totals["n"] if info.num_labels else None,
        "output_cosine": None if info.num_labels else totals["kl"] / totals["n"],
        "tokens_per_layer": tokens_attn, "tokens_per_layer_mlp": tokens_mlp,
        "final_tokens": tokens_mlp[-1] if tokens_mlp else None,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": int(cfg.batch_size), "timed_batches": len(times["comp"]), "warmup_batches": int(cfg.warmup),
        "images_skipped": len(source.skipped), "skipped": [f"{n}: {why}" for n, why in list(source.skipped.items())[:50]],
        "kernel": kernels.path_taken(), "data": source.description, "method_config": method.describe(), **fidelity, **search_info,
    }
    if source.skipped:
        run.write_text("skipped.txt", "".join(f"{n}\t{why}\n" for n, why in source.skipped.items()))
        console.print(f"[yellow]warning[/]: skipped {len(source.skipped)} image(s) that did not "
                      f"decode (first: {next(iter(source.skipped.items()))[0]}; all in "
                      f"{run.file('skipped.txt')}); metrics.json: images_skipped", soft_wrap=True)
    top = (f"top-1 {metrics['top1']:.4f} (baseline {metrics['baseline_top1']:.4f}), "
           if labelled else "")
    fidelity_text = (f"agreement {metrics['agreement']:.4f}" if info.num_labels
                     else f"output cosine {metrics['output_cosine']:.4f}")
    console.print(f"{method.name}: {top}{fidelity_text}, speedup {metrics['speedup']:.2f}x, "
                  f"GFLOPs {gflops:.4f} of {base_gflops:.4f}, tokens {tokens_attn}")
    return metrics


def _fidelity_and_figure(cfg, run, patch, info, cinfo, source, evaluated, baseline, forward_comp,
                         capture_base, capture_comp) -> dict[str, Any]:
    """Untimed, traced pass: patch features against the baseline's, and the PNG."""
    n = min(int(cfg.fidelity_images), len(evaluated))
    n_vis = min(int(cfg.vis.images), n)
    if n == 0:
        return {}
    cos_sum, covered, total, cls_sum, count = 0.0, 0, 0, 0.0, 0
    vis_images, vis_sources = [], []
    p = info.prefix_tokens
    patch.trace_source = True
    try:
        with torch.inference_mode():
            for batch in source.batches(int(cfg.batch_size), evaluated[:n]):
                x = _model_input(batch.images, info, patch.model)
                baseline(x)
                base_tokens = capture_base.tokens.float()
                forward_comp(x)
                comp_tokens = capture_comp.tokens.float()
                st = patch.last_state
                src = st.source
                for i in range(len(x)):
                    owner = patch_owner(src[i], p).to(comp_tokens.device)  # (N0 - p,)
                    ok = owner >= 0
                    mapped = comp_tokens[i, p:][owner.clamp_min(0)]
                    cos = F.cosine_similarity(mapped, base_tokens[i, p:], dim=-1)
                    cos_sum += float(cos[ok].sum())
                    covered += int(ok.sum())
                    total += int(ok.numel())
                    if p:
                        cls_sum += float(F.cosine_similarity(comp_tokens[i, 0], base_tokens[i, 0], dim=0))
                    count += 1
                shown = sum(len(v) for v in vis_images)
                if shown < n_vis:
                    take = n_vis - shown
                    vis_images.append(batch.images[:take])
                    vis_sources.append(st.scratch.get("groups", src)[:take].cpu())
    finally:
        patch.trace_source = False
    out = {"patch_feature_cosine": cos_sum / max(covered, 1), "patch_coverage": covered / max(total, 1),
           "fidelity_images": count}
    if p:
        out["cls_feature_cosine"] = cls_sum / max(count, 1)
    if vis_images:
        path = save_merge_figure(run.file(cfg.vis.file), torch.cat(vis_images), torch.cat(vis_sources), p, info.grid,
                                 title=merge_title(cfg.method, info.family))
        out["figure"] = path.name
    return out
