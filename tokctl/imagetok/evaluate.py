"""`tokctl tokenize-image eval`: rate-distortion of tokenizers against JPEG and WebP.

For each tokenizer and token budget (8, 16, 32, ... up to its maximum for a variable-length
tokenizer; its one length otherwise) every image goes through the real token file (written,
read back, decoded), so the bytes counted are the file's exact size. JPEG and WebP are swept
over their quality range and rate-controlled to the same byte budgets. Per codec and budget:
bytes per image, PSNR, SSIM, MS-SSIM and rFID, in metrics.json and a rate-distortion PNG.
"""

from __future__ import annotations

import numpy as np
import torch

from tokctl import kernels, measure
from tokctl.console import console, err_console, progress_bar, step
from tokctl.errors import UserError
from tokctl.imagetok import baselines, fid, tokfile
from tokctl.imagetok.checkpoint import load_tokenizer
from tokctl.imagetok.codec import decode_files, encode_images
from tokctl.imagetok.data import eval_images, to_image, to_tensor
from tokctl.imagetok.models.base import prefix_budgets
from tokctl.imagetok.losses import ms_ssim_per_image, psnr_per_image, ssim_per_image
from tokctl.runs import Run


def token_budgets(model, budgets) -> list[int]:
    if budgets:
        bad = [b for b in budgets if not 1 <= int(b) <= model.max_tokens]
        if bad:
            raise UserError(f"budgets {bad}: this tokenizer makes 1 to {model.max_tokens} tokens")
        if not model.variable_length and any(int(b) != model.max_tokens for b in budgets):
            raise UserError(f"{model.name} is fixed-length ({model.max_tokens} tokens): "
                            f"leave budgets unset")
        return sorted({int(b) for b in budgets})
    return prefix_budgets(model)


def quality(recon: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"psnr": psnr_per_image(recon, images), "ssim": ssim_per_image(recon, images),
            "ms_ssim": ms_ssim_per_image(recon, images)}


def speeds(encoders: dict, decoders: dict, n_img: int, repeats: int) -> dict:
    """Encode and decode speed of every codec, timed round-robin (interleaved, after a warm-up
    round) over ``repeats`` passes on the same images: images per second from the median pass,
    and each tokenizer's speed against JPEG's (the baseline) with the spread over passes."""
    enc = measure.round_robin(encoders, repeats, warmup=1)
    dec = measure.round_robin(decoders, repeats, warmup=1)
    out = {}
    for codec in encoders:
        out[codec] = {"encode_images_per_s": n_img / measure.median(enc[codec]),
                      "decode_images_per_s": n_img / measure.median(dec[codec])}
        if codec not in baselines.CODECS:
            out[codec]["vs_jpeg"] = {"encode": measure.compare(enc["jpeg"], enc[codec]),
                                     "decode": measure.compare(dec["jpeg"], dec[codec])}
    return out


def run(cfg, run: Run) -> dict:
    kernels.reset_counts()
    paths = [cfg.tokenizer_path] + list(cfg.get("compare_with") or [])
    tokenizers = [load_tokenizer(p) for p in paths]
    size = tokenizers[0].model.image_size
    if any(t.model.image_size != size for t in tokenizers):
        raise UserError("compare_with: every tokenizer must work at the same image size")
    names, images, skipped = eval_images(cfg.data.path, size, cfg.data.get("limit"))
    n_img = len(names)
    if skipped:
        console.print(f"[yellow]warning[/]: {len(skipped)} of the default evaluation photos could "
                      f"not be loaded and are left out ({', '.join(skipped)}); metrics.json: "
                      f"images_skipped")
    # the originals as 8-bit pixels, as every codec sees them
    images = torch.stack([to_tensor(to_image(x)) for x in images])
    run.update_env(eval_images=n_img, image_size=size, eval_names=names)
    entries, tokenizer_info, curves = [], [], {}
    encoders, decoders = {}, {}  # per codec, timed together at the end
    want_rfid = bool(cfg.rfid)
    ref_feats = None
    if want_rfid:  # the slow part: say so, measured, and how to skip it
        t0 = time.perf_counter()
        with step(f"rFID: Inception features of the {n_img} originals",
                  "the slow part of an eval; rfid=false skips it"):
            ref_feats = fid.features(images)
        per_set = time.perf_counter() - t0
        sets = sum(len(token_budgets(t.model, cfg.budgets if i == 0 else None))
                   for i, t in enumerate(tokenizers)) * 3  # tokenizers, then JPEG and WebP
        left = per_set * sets
        err_console.print(f"[dim]rFID will take about "
                          f"{f'{left / 60:.0f} min' if left >= 90 else f'{left:.0f} s'} more here "
                          f"({sets} sets of reconstructions x {per_set:.1f} s); rfid=false skips "
                          f"it[/]", soft_wrap=True)
    repeats = int(cfg.speed_repeats)
    labels: list[str] = []

    def record(codec: str, recon: torch.Tensor, sizes: list[int], extra: dict) -> dict:
        q = quality(recon, images)
        for i in range(n_img):
            run.append_sample({"codec": codec, **extra, "image": names[i], "bytes": sizes[i],
                               **{k: float(v[i]) for k, v in q.items()}})
        entry = {"codec": codec, **extra, "bytes_per_image": float(np.mean(sizes)),
                 **{k: float(v.mean()) for k, v in q.items()}}
        entry["rfid"] = fid.frechet_distance(ref_feats, fid.features(recon)) if want_rfid else None
        entries.append(entry)
        return entry

    total = sum(len(token_budgets(t.model, cfg.budgets if i == 0 else None))
                for i, t in enumerate(tokenizers))
    with progress_bar("tokenizers", total) as advance:
        for i, tok in enumerate(tokenizers):
            label = tok.name if tok.name not in labels else f"{tok.name}-{i}"
            labels.append(label)
            model = tok.model
            budgets = token_budgets(model, cfg.budgets if i == 0 else None)
            pil = [to_image(x) for x in images]
            model.quantizer.reset_usage()
            files_full = encode_images(tok, pil, model.max_tokens)
            usage = model.quantizer.usage()
            tokens = [tokfile.loads(b, model.codebook_size, tok.hash).tokens for b in files_full]
            for n in budgets:
                blobs = [tokfile.dumps(tokfile.TokenFile(tokfile.KINDS.get(tok.name, 31), tok.hash,
                                                         size, size, t[:n]), model.codebook_size)
                         for t in tokens]
                parsed = [tokfile.loads(b, model.codebook_size, tok.hash) for b in blobs]
                decoded = decode_files(tok, parsed)
                recon = torch.stack([to_tensor(im) for im in decoded])
                # encode(decode(tokens)): how many of the kept tokens come back unchanged
                again = model.encode(recon)[:, :n]
                kept = torch.from_numpy(np.stack([t[:n] for t in tokens]))
                agreement = float((again == kept).double().mean())
                record(label, recon, [len(b) for b in blobs],
                       {"tokens": n, "kind": "tokenizer", "reencode_agreement": agreement})
                if n == model.max_tokens:
                    encoders[label] = (lambda tok=tok, pil=pil, n=n: encode_images(tok, pil, n))
                    decoders[label] = (lambda tok=tok, parsed=parsed: decode_files(tok, parsed))
                advance(1, info=f"{label} {n} tokens")
            tokenizer_info.append({"label": label, "path": str(tok.path), "hash": f"{tok.hash:06x}",
                                   "max_tokens": model.max_tokens,
                                   "codebook_size": model.codebook_size,
                                   "bits_per_token": tokfile.bits_for(model.codebook_size),
                                   "variable_length": model.variable_length,
                                   "parameters": sum(p.numel() for p in model.parameters()),
                                   "trained": tok.trained, "codebook_usage": usage})

    # JPEG and WebP: every quality once, then rate control to each tokenizer byte budget
    budgets_bytes = sorted({round(e["bytes_per_image"]) for e in entries})
    with progress_bar("jpeg/webp", 2 * len(budgets_bytes)) as advance:
        for codec in baselines.CODECS:
            sweep = baselines.sweep(images, codec)
            curves[codec] = []
            for qi, q in enumerate(baselines.CODECS[codec]["qualities"]):
                recon = torch.stack([rows[qi][2] for rows in sweep])
                qq = quality(recon, images)
                curves[codec].append({"quality": q, "bytes_per_image":
                                      float(np.mean([len(rows[qi][1]) for rows in sweep])),
                                      **{k: float(v.mean()) for k, v in qq.items()}})
            for budget in budgets_bytes:
                qualities, sizes, recon, over = baselines.at_budget(sweep, budget)
                record(codec, recon, sizes, {"bytes_target": budget, "over_budget": over,
                                             "kind": "classical",
                                             "quality_median": float(np.median(qualities))})
                advance(1, info=f"{codec} {budget} B")
            mid = [rows[len(rows) // 2] for rows in sweep]
            encoders[codec] = (lambda codec=codec, q=mid[0][0]: [
                baselines.compress(to_image(x), codec, q) for x in images])
            decoders[codec] = (lambda mid=mid: [baselines.decompress(r[1]) for r in mid])
    speed = speeds(encoders, decoders, n_img, repeats)

    for e in entries:
        if e["kind"] == "tokenizer":
            e["bytes_target"] = round(e["bytes_per_image"])
    best = best_by_budget(entries)
    monotonic = {label: monotonic_in_tokens(entries, label) for label in labels}
    plot_rate_distortion(run.file("rate_distortion.png"), entries, curves, labels)
    print_table(entries, best)
    return {"images": n_img, "images_skipped": len(skipped), "skipped": skipped,
            "image_size": size, "tokenizers": tokenizer_info,
            "entries": entries, "best_by_budget": best, "monotonic_in_tokens": monotonic,
            "speed": speed, "curves": curves, "threads": torch.get_num_threads(),
            "kernel": kernels.path_taken(),
            "notes": "bytes = exact file sizes; JPEG optimize=True, WebP method=6, rate-controlled "
                     "per image to the budget (over_budget = images whose lowest quality is "
                     "still larger, counted at their real size); MS-SSIM: 3 scales, window 7 "
                     "(64x64 images); rFID on the eval images only (small-sample)"}


def best_by_budget(entries: list[dict]) -> list[dict]:
    """At each byte budget: the codec with the best SSIM and the best rFID among the points that
    fit in it, measured at that budget or a smaller one (a classical codec that could not reach
    its target is not a candidate)."""
    out = []
    for budget in sorted({e["bytes_target"] for e in entries}):
        cands = [e for e in entries if not e.get("over_budget") and e["bytes_target"] <= budget
                 and e["bytes_per_image"] <= budget]
        if not cands:
            continue
        row = {"bytes_target": budget,
               "best_ssim": max(cands, key=lambda e: e["ssim"])["codec"],
               "best_ssim_value": max(e["ssim"] for e in cands)}
        with_fid = [e for e in cands if e.get("rfid") is not None]
        if with_fid:
            b = min(with_fid, key=lambda e: e["rfid"])
            row.update(best_rfid=b["codec"], best_rfid_value=b["rfid"])
        row["candidates"] = sorted({e["codec"] for e in cands})
        out.append(row)
    return out


def monotonic_in_tokens(entries: list[dict], label: str) -> dict:
    rows = sorted((e for e in entries if e["codec"] == label), key=lambda e: e["tokens"])
    out = {}
    for key in ("ssim", "psnr", "ms_ssim"):
        vals = [e[key] for e in rows]
        out[key] = all(b >= a for a, b in zip(vals, vals[1:]))
    return out


def plot_rate_distortion(path, entries, curves, labels) -> None:
    """The run's rate_distortion.png: the same figure `tokctl report` draws (tokctl.plots)."""
    from pathlib import Path

    from tokctl.plots import RunRecord, rate_distortion_figure

    record = RunRecord(Path(path).parent, "tokenize-image eval", "running", {},
                       {"entries": entries, "curves": curves})
    rate_distortion_figure([record], Path(path),
                           title=f"tokenize-image eval: rate-distortion of {', '.join(labels)} "
                                 f"against JPEG and WebP on the eval images")


def print_table(entries, best) -> None:
    from rich.table import Table

    table = Table(title="rate-distortion (means over images)")
    for col in ("codec", "tokens/q", "bytes", "PSNR", "SSIM", "MS-SSIM", "rFID"):
        table.add_column(col, justify="right")
    for e in sorted(entries, key=lambda e: (e["bytes_target"], e["codec"])):
        tq = str(e.get("tokens", "")) or f"q~{e.get('quality_median', 0):g}"
        over = f" ({e['over_budget']} over)" if e.get("over_budget") else ""
        table.add_row(e["codec"], tq, f"{e['bytes_per_image']:.0f}{over}", f"{e['psnr']:.2f}",
                      f"{e['ssim']:.3f}", f"{e['ms_ssim']:.3f}",
                      "-" if e["rfid"] is None else f"{e['rfid']:.1f}")
    console.print(table)
