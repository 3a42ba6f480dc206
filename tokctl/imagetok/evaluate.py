"""`tokctl tokenize-image eval`: rate-distortion of tokenizers against JPEG, WebP, AVIF, JPEG XL.

For each tokenizer and token budget (8, 16, 32, ... up to its maximum for a variable-length
tokenizer; its one length otherwise) every image goes through the real token file (written,
read back, decoded), so the bytes counted are the file's exact size. The classical codecs
(baselines.py) are swept over their quality range and rate-controlled to the same byte budgets;
each one's floor (its smallest files) is reported too. Per codec and budget:
bytes per image, PSNR, SSIM, MS-SSIM and rFID, in metrics.json and a rate-distortion PNG.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tokctl import kernels, measure
from tokctl.console import console, err_console, progress_bar, step
from tokctl.errors import UserError
from tokctl.imagetok import baselines, fid, tokfile
from tokctl.imagetok.checkpoint import load_tokenizer
from tokctl.imagetok import prior as prior_mod
from tokctl.imagetok import rdo, refine
from tokctl.imagetok.codec import (PriorLookup, decode_files, encode_images, image_ids,
                                   rate_aware_file, read_token_bytes)
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
        if codec not in baselines.CODECS and "jpeg" in enc:
            out[codec]["vs_jpeg"] = {"encode": measure.compare(enc["jpeg"], enc[codec]),
                                     "decode": measure.compare(dec["jpeg"], dec[codec])}
    return out


def _prior_of(cfg, tok, first: bool):
    """The token prior that codes this tokenizer's files in eval: prior_path= for the first
    tokenizer, else the shipped one for it; none with coded=false."""
    if not cfg.get("coded", True):
        return None
    return prior_mod.prior_for(tok.hash, cfg.get("prior_path") if first else None)


def _coded(tok, coder, tokens: list[np.ndarray], n: int, size: int,
           chosen: list[np.ndarray] | None = None) -> dict:
    """Each image's token file as encode writes it with the prior (coded, or plain where that
    is smaller): real sizes; bits per token of the coder's bytes (headers left out) against the
    ideal -log2 p; how many files came out coded; whether every file decodes back to its ids.
    ``chosen``: rate-aware ids, written unless their file comes out plain (then the nearest
    ``tokens``, as encode does); ``held`` says which ids each file holds, ``files`` the files."""
    files, payload_bits, ideal, ok, n_coded, held = [], 0, 0.0, True, 0, []
    lookup = PriorLookup(coder.path)
    for i, t in enumerate(tokens):
        near = np.ascontiguousarray(t[:, :n])
        ids = near if chosen is None else np.ascontiguousarray(chosen[i][:, :n])
        # the coding probabilities once, for the payload and the ideal bits alike
        probs = coder.model.coding_probabilities(ids, n)
        payload = prior_mod.encode_ids(coder.model, ids, probs)
        blob, held_ids = rate_aware_file(tok, coder, size, size, near, ids, payload)
        if held_ids is not ids:  # the nearest ids, plain: their coded length is the one to count
            ids, probs = held_ids, coder.model.coding_probabilities(held_ids, n)
            payload = prior_mod.encode_ids(coder.model, ids, probs)
        held.append(ids)
        n_coded += tokfile.read_header(blob)[0].prior_hash is not None
        files.append(blob)
        payload_bits += 8 * len(payload)
        ideal += float(prior_mod.ideal_bits(coder.model, ids, probs).sum())
        ok &= bool(np.array_equal(read_token_bytes(tok, blob, lookup).tokens, ids))
    count = sum(t.shape[0] for t in tokens) * n
    return {"files": files, "sizes": [len(b) for b in files],
            "bits_per_token": payload_bits / count,
            "ideal_bits_per_token": ideal / count, "round_trip": ok, "files_coded": n_coded,
            "held": held}


def run(cfg, run: Run) -> dict:
    kernels.reset_counts()
    paths = [cfg.tokenizer_path] + list(cfg.get("compare_with") or [])
    tokenizers = [load_tokenizer(p) for p in paths]
    tile = tokenizers[0].model.image_size
    if any(t.model.image_size != tile for t in tokenizers):
        raise UserError("compare_with: every tokenizer must work at the same image size")
    # the images' size: the tokenizer's (one tile an image), or larger (tiles of it)
    size = int(cfg.get("image_size") or tile)
    if size < 8:
        raise UserError(f"image_size={size}: give a side of at least 8 pixels (or null)")
    names, images, skipped = eval_images(cfg.data.path, size, cfg.data.get("limit"),
                                         cfg.data.get("photos") or "default")
    n_img = len(names)
    if skipped:
        which = "images in data.path" if cfg.data.path else "default evaluation photos"
        console.print(f"[yellow]warning[/]: {len(skipped)} {which} could not be loaded and are "
                      f"left out ({', '.join(skipped)}); metrics.json: images_skipped",
                      soft_wrap=True)
    # the originals as 8-bit pixels, as every codec sees them
    images = torch.stack([to_tensor(to_image(x)) for x in images])
    run.update_env(eval_images=n_img, image_size=size, tile_size=tile, eval_names=names)
    entries, tokenizer_info, curves = [], [], {}
    encoders, decoders = {}, {}  # per codec, timed together at the end
    codecs, missing = baselines.check_codecs(cfg.get("codecs") or baselines.DEFAULT_CODECS)
    for m in missing:
        err_console.print(f"[yellow]warning:[/] classical codec left out: {m}", soft_wrap=True)
    # the settings, checked once before the slow work: the first tokenizer must be able to use
    # them (later ones without a prior run without them)
    priors = [_prior_of(cfg, t, first=i == 0) for i, t in enumerate(tokenizers)]
    rate_lambda = rdo.check_rate_lambda(cfg.get("rate_lambda") or 0.0)
    rdo.check_rate_aware(tokenizers[0].model, priors[0], rate_lambda)
    steps = refine.check_refine_steps(cfg.get("refine_steps") or 0)
    refine_rate = refine.check_refine_rate(tokenizers[0].model, priors[0], steps,
                                           cfg.get("refine_rate") or 0.0)
    want_rfid = bool(cfg.rfid)
    ref_feats = None
    if want_rfid:  # the slow part: say so, measured, and how to skip it
        t0 = time.perf_counter()
        with step(f"rFID: Inception features of the {n_img} originals",
                  "the slow part of an eval; rfid=false skips it"):
            ref_feats = fid.features(images)
        per_set = time.perf_counter() - t0
        sets = sum(len(token_budgets(t.model, cfg.budgets if i == 0 else None))
                   for i, t in enumerate(tokenizers)) * (2 + len(codecs))  # tokenizers (plain
        # and coded: the same pixels, features taken again), then each classical codec
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
        # the SVD form: exact with a few images, where sqrtm of the rank-deficient product is not
        entry["rfid"] = (fid.frechet_distance_svd(ref_feats, fid.features(recon)) if want_rfid
                         else None)
        entries.append(entry)
        return entry

    total = sum(len(token_budgets(t.model, cfg.budgets if i == 0 else None))
                for i, t in enumerate(tokenizers))
    pil = [to_image(x) for x in images]
    with progress_bar("tokenizers", total) as advance:
        for i, tok in enumerate(tokenizers):
            label = tok.name if tok.name not in labels else f"{tok.name}-{i}"
            labels.append(label)
            model = tok.model
            budgets = token_budgets(model, cfg.budgets if i == 0 else None)
            coder = priors[i]
            lam = rate_lambda if coder is not None else 0.0
            mu = refine_rate if coder is not None else 0.0
            # each image's ids (tiles, max): the plain rows' nearest ones (of latents refined
            # with refine_steps, for bits too with refine_rate) and the +prior rows' chosen ones
            # (rate-aware with rate_lambda > 0, else the same)
            full = image_ids(tok, pil, model.max_tokens, coder if lam or mu else None, lam,
                             steps, mu)
            model.quantizer.reset_usage()
            for t in full[0]:
                model.quantizer.count_usage(torch.from_numpy(t))
            usage = model.quantizer.usage()
            kind = tokfile.KINDS.get(tok.name, tokfile.OTHER_KIND)
            for n in budgets:
                # refined latents are refined for the decoder of n tokens: encoded per budget
                tokens, chosen = full if not steps or n == model.max_tokens else image_ids(
                    tok, pil, n, coder if lam or mu else None, lam, steps, mu)
                blobs = [tokfile.dumps(tokfile.TokenFile(kind, tok.hash, size, size, t[:, :n]),
                                       model.codebook_size) for t in tokens]
                parsed = [read_token_bytes(tok, b) for b in blobs]
                decoded = decode_files(tok, parsed)
                recon = torch.stack([to_tensor(im) for im in decoded])
                # encode(decode(tokens)): how many of the kept tokens come back unchanged
                again = [read_token_bytes(tok, b).tokens[:, :n]
                         for b in encode_images(tok, decoded, n, refine_steps=steps)]
                agreement = float(np.mean([(a == t[:, :n]).mean() for a, t in zip(again, tokens)]))
                extra = {"tokens": n, "tiles": int(tokens[0].shape[0]), "kind": "tokenizer",
                         "reencode_agreement": agreement,
                         "bits_per_token": float(tokfile.bits_for(model.codebook_size)),
                         "refine_steps": steps, "refine_rate": mu}
                if coder is not None:
                    coded = _coded(tok, coder, tokens, n, size, chosen if lam else None)
                    extra.update(coded_bytes_per_image=float(np.mean(coded["sizes"])),
                                 coded_bits_per_token=coded["bits_per_token"])
                entry = record(label, recon, [len(b) for b in blobs], extra)
                if coder is not None:
                    coded_recon = recon if not lam else torch.stack([
                        to_tensor(im) for im in decode_files(tok, [
                            tokfile.TokenFile(kind, tok.hash, size, size, t)
                            for t in coded["held"]])])
                    record(f"{label}+prior", coded_recon, coded["sizes"],
                           {**extra, "bits_per_token": coded["bits_per_token"],
                            "ideal_bits_per_token": coded["ideal_bits_per_token"],
                            "prior": f"{coder.hash:06x}", "coded_round_trip": coded["round_trip"],
                            "files_coded": coded["files_coded"], "rate_lambda": lam,
                            "changed_tokens": float(np.mean(
                                [(c != t[:, :n]).mean() for c, t in zip(coded["held"], tokens)])),
                            "reencode_agreement": entry["reencode_agreement"]})
                if n == model.max_tokens:
                    encoders[label] = (lambda tok=tok, pil=pil, n=n, coder=coder, mu=mu:
                                       encode_images(tok, pil, n, coder if mu else None,
                                                     refine_steps=steps, refine_rate=mu))
                    decoders[label] = (lambda tok=tok, parsed=parsed: decode_files(tok, parsed))
                    if coder is not None:  # through real coded files: coding and decoding the ids
                        coded_files = coded["files"]
                        lookup = PriorLookup(coder.path)
                        encoders[f"{label}+prior"] = (
                            lambda tok=tok, pil=pil, n=n, coder=coder, lam=lam, mu=mu:
                            encode_images(tok, pil, n, coder, lam, steps, mu))
                        decoders[f"{label}+prior"] = (
                            lambda tok=tok, files=coded_files, lookup=lookup: decode_files(
                                tok, [read_token_bytes(tok, b, lookup) for b in files]))
                advance(1, info=f"{label} {n} tokens")
            if coder is not None:
                labels.append(f"{label}+prior")
            tokenizer_info.append({"label": label, "path": str(tok.path), "hash": f"{tok.hash:06x}",
                                   "max_tokens": model.max_tokens,
                                   "codebook_size": model.codebook_size,
                                   "bits_per_token": tokfile.bits_for(model.codebook_size),
                                   "prior": None if coder is None else
                                   {"path": str(coder.path), "hash": f"{coder.hash:06x}",
                                    "parameters": sum(p.numel() for p in coder.model.parameters())},
                                   "variable_length": model.variable_length,
                                   "parameters": sum(p.numel() for p in model.parameters()),
                                   "trained": tok.trained, "codebook_usage": usage})

    # the classical codecs: every quality once, then rate control to each tokenizer byte budget
    budgets_bytes = sorted({round(e["bytes_per_image"]) for e in entries})
    strength = {"webp": cfg.get("webp_method"), "avif": cfg.get("avif_speed"),
                "jxl": cfg.get("jxl_effort")}
    floors = {}
    with progress_bar("classical codecs", len(codecs) * (n_img + len(budgets_bytes))) as advance:
        for codec in codecs:
            opts = baselines.options(codec, strength.get(codec))
            sweep = baselines.sweep(images, codec, opts,
                                    progress=lambda: advance(1, info=f"{codec} sweep"))
            curves[codec] = []
            for qi, q in enumerate(baselines.CODECS[codec]["qualities"]):
                recon = torch.stack([rows[qi][2] for rows in sweep])
                qq = quality(recon, images)
                curves[codec].append({"quality": q, "bytes_per_image":
                                      float(np.mean([len(rows[qi][1]) for rows in sweep])),
                                      **{k: float(v.mean()) for k, v in qq.items()}})
            # the floor: each image's smallest file (its lowest quality, or whichever is smaller)
            _, sizes, recon, _ = baselines.at_budget(sweep, 0)
            floors[codec] = {"bytes_per_image": float(np.mean(sizes)), "min_bytes": min(sizes),
                             "max_bytes": max(sizes), "options": opts,
                             **{k: float(v.mean()) for k, v in quality(recon, images).items()}}
            for budget in budgets_bytes:
                qualities, sizes, recon, over = baselines.at_budget(sweep, budget)
                record(codec, recon, sizes, {"bytes_target": budget, "over_budget": over,
                                             "kind": "classical",
                                             "quality_median": float(np.median(qualities))})
                advance(1, info=f"{codec} {budget} B")
            mid = [rows[len(rows) // 2] for rows in sweep]
            encoders[codec] = (lambda codec=codec, q=mid[0][0], opts=opts: [
                baselines.compress(to_image(x), codec, q, opts) for x in images])
            decoders[codec] = (lambda mid=mid: [baselines.decompress(r[1]) for r in mid])
    speed = speeds(encoders, decoders, n_img, repeats)

    for e in entries:
        if e["kind"] == "tokenizer":
            e["bytes_target"] = round(e["bytes_per_image"])
    best = best_by_budget(entries)
    monotonic = {label: monotonic_in_tokens(entries, label) for label in labels}
    plot_rate_distortion(run.file("rate_distortion.png"), entries, curves, labels)
    print_table(entries, best, floors)
    return {"images": n_img, "images_skipped": len(skipped), "skipped": skipped,
            "image_size": size, "tokenizers": tokenizer_info,
            "entries": entries, "floors": floors, "codecs_missing": missing,
            "best_by_budget": best, "monotonic_in_tokens": monotonic,
            "speed": speed, "curves": curves, "threads": torch.get_num_threads(),
            "kernel": kernels.path_taken(),
            "notes": "bytes = exact file sizes (headers and containers included); JPEG "
                     "optimize=True, WebP method=6, AVIF at avif_speed, JPEG XL at jxl_effort, "
                     "rate-controlled per image to the budget (over_budget = images whose lowest quality is "
                     "still larger, counted at their real size); MS-SSIM: 3 scales, window 7 "
                     "(64x64 images); rFID on the eval images only (small-sample)"}


def best_by_budget(entries: list[dict]) -> list[dict]:
    """At each byte budget: the codec with the best SSIM and the best rFID among the points that
    fit in it, measured at that budget or a smaller one (a classical codec that could not reach
    its target is not a candidate)."""
    out = []
    for budget in sorted({e["bytes_target"] for e in entries}):
        # a tokenizer's target is its mean size rounded: it fits its own (coded sizes vary)
        cands = [e for e in entries if not e.get("over_budget") and e["bytes_target"] <= budget
                 and e["bytes_per_image"] <= budget + 0.5]
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


def print_table(entries, best, floors=None) -> None:
    from rich.table import Table

    table = Table(title="rate-distortion (means over images)")
    for col in ("codec", "tokens/q", "bytes", "bits/token", "PSNR", "SSIM", "MS-SSIM", "rFID"):
        table.add_column(col, justify="right")
    for e in sorted(entries, key=lambda e: (e["bytes_target"], e["codec"])):
        tq = str(e.get("tokens", "")) or f"q~{e.get('quality_median', 0):g}"
        over = f" ({e['over_budget']} over)" if e.get("over_budget") else ""
        bits = f"{e['bits_per_token']:.2f}" if "bits_per_token" in e else ""
        table.add_row(e["codec"], tq, f"{e['bytes_per_image']:.0f}{over}", bits, f"{e['psnr']:.2f}",
                      f"{e['ssim']:.3f}", f"{e['ms_ssim']:.3f}",
                      "-" if e["rfid"] is None else f"{e['rfid']:.1f}")
    console.print(table)
    if floors:
        ft = Table(title="classical codecs' floors (each image's smallest file)")
        for col in ("codec", "bytes", "min-max", "PSNR", "SSIM", "MS-SSIM"):
            ft.add_column(col, justify="right")
        for codec, f in floors.items():
            ft.add_row(codec, f"{f['bytes_per_image']:.0f}", f"{f['min_bytes']}-{f['max_bytes']}",
                       f"{f['psnr']:.2f}", f"{f['ssim']:.3f}", f"{f['ms_ssim']:.3f}")
        console.print(ft)
