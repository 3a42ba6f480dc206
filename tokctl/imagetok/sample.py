"""`tokctl tokenize-image sample`: images drawn from the token prior (prior.py) and decoded by its
tokenizer: token files (the tokfile format, plain bits) and a PNG grid in the run folder.

``method=ar`` with ``batch`` > 1 samples a batch of sequences at once over the prior's own
key/value cache (the fastest way to make many images); any other method, or ``batch=1``, runs
each image through the decoding engine (prior_target.py), one sequence at a time, so that `ar`,
the drafting methods and LANTERN (method=lantern) are timed the same way.

``condition=c`` samples from a cluster-conditional prior (prior_train.py, clusters.py): every
sequence starts with cluster c's id, and ``cluster_match`` reports the share of images whose own
colour layout is nearest to cluster c (beside ``cluster_share``, c's share of the training crops:
what an unconditional prior would score). ``guidance`` > 1 samples with classifier-free guidance
(the prior is trained with condition dropout, so it also predicts unconditionally).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from PIL import Image

from tokctl.console import progress_bar
from tokctl.errors import UserError
from tokctl.imagetok import tokfile
from tokctl.imagetok.checkpoint import load_tokenizer
from tokctl.imagetok.prior import TokenPrior, guided_logits, load_prior


def load_pair(tokenizer_path, prior_path, conditional: bool = False):
    """The tokenizer and its prior: the one given, else the tokenizer's shipped prior
    (weights/*.prior.pt; ``conditional``: its cluster-conditional one, weights/*.prior-cond.pt)."""
    tok = load_tokenizer(tokenizer_path)
    if conditional:
        prior = _given_or_shipped(tok, prior_path, "*.prior-cond.pt", "prior_path",
                                  "cluster-conditional prior", "tokenize-image prior train "
                                  "prior.conditions=N tokenizer_path=...")
    else:
        prior = _given_or_shipped(tok, prior_path, "*.prior.pt", "prior_path", "prior",
                                  "tokenize-image prior train tokenizer_path=...")
    return tok, prior


def code_vectors(tok) -> torch.Tensor:
    """(codebook, dim) latent vector of every code id (a residual quantiser's first stage)."""
    q = tok.model.quantizer
    ids = torch.full((q.codebook_size, 1, q.depth), -1, dtype=torch.long)
    ids[:, 0, 0] = torch.arange(q.codebook_size)
    with torch.no_grad():
        return q.embed(ids)[:, 0].float()


def _given_or_shipped(tok, path, pattern: str, option: str, what: str, command: str):
    """A prior for ``tok`` beside its coding prior: the one given as ``option``, else the shipped
    weights/``pattern`` of this tokenizer."""
    from tokctl.imagetok.checkpoint import WEIGHTS_DIR

    paths = [path] if path else sorted(WEIGHTS_DIR.glob(pattern))
    for p in paths:
        prior = load_prior(p)
        if prior.tokenizer_hash == tok.hash:
            return prior
        if path:
            raise UserError(f"{option}={path}: a prior of another tokenizer's tokens "
                            f"(tokenizer {prior.tokenizer_hash:06x}; {tok.path} is {tok.hash:06x})")
    raise UserError(f"no shipped {what} for {tok.path}: train one with `tokctl {command}` and "
                    f"give {option}=")


def load_draft(tok, path):
    """The smaller prior that drafts for `method=draft` (and lantern's ``method.base=draft``):
    the one given, else the shipped draft of this tokenizer (weights/*.prior-draft.pt)."""
    return _given_or_shipped(tok, path, "*.prior-draft.pt", "draft_prior_path", "draft prior",
                             "tokenize-image prior train prior.width=... (a smaller prior)")


@torch.no_grad()
def sample_batch(prior: TokenPrior, b: int, sampling, generator, start: int | None = None,
                 guidance: float = 1.0) -> torch.Tensor:
    """(b, max_tokens) ids drawn together, one position a step over the prior's cache, after the
    start id ``start`` (default BOS); ``guidance`` != 1 runs each sequence from BOS too, as b more
    rows, for classifier-free guidance."""
    from tokctl.decode.sampling import probs

    caches = [[] for _ in prior.blocks]
    rows = 2 * b if guidance != 1 else b
    prev = torch.full((rows, 1), prior.vocab if start is None else start, dtype=torch.long)
    prev[b:] = prior.vocab
    out = torch.zeros(b, prior.max_tokens, dtype=torch.long)
    for i in range(prior.max_tokens):
        logits = prior.step_logits(prev, i, caches)
        if guidance != 1:
            logits = guided_logits(logits[:b], logits[b:], guidance)
        out[:, i] = torch.multinomial(probs(logits, sampling), 1, generator=generator)[:, 0]
        prev = out[:, i:i + 1].repeat(rows // b, 1)
    return out


def engine(method, tok, prior, draft=None, guidance: float = 1.0):
    """``method`` set up on the prior as a decoding-engine target (``draft``: a smaller prior
    for the methods that need a draft model; ``guidance``: classifier-free guidance)."""
    from tokctl.imagetok.prior_target import PriorSource, PriorTarget

    target = PriorTarget(prior.model, guidance=guidance)
    if draft is not None:
        draft = PriorSource(f"tokctl-prior:{draft.hash:06x}", draft.model)
    # the name keys the measured verify costs (budget.py): a guided forward runs two rows
    guided = "" if guidance == 1 else f"+guidance{guidance:g}"
    loaded = PriorSource(f"tokctl-prior:{prior.hash:06x}{guided}", prior.model, draft)
    loaded.code_vectors = code_vectors(tok)
    method.setup(target, loaded)
    return target


def save_grid(images: list[Image.Image], path, columns: int | None = None) -> None:
    cols = int(columns or math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    grid.save(path)


def write_images(run, tok, ids: np.ndarray, columns=None, grid_max: int = 64) -> list[Image.Image]:
    """Token files tokens/NNNN.tok, the decoded images, grid.png of the first ``grid_max``."""
    from tokctl.imagetok.codec import decode_files

    folder = run.file("tokens")
    folder.mkdir(exist_ok=True)
    size = tok.model.image_size
    kind = tokfile.KINDS.get(tok.name, tokfile.OTHER_KIND)
    files = []
    for i, row in enumerate(ids):
        tf = tokfile.TokenFile(kind, tok.hash, size, size, row[None].astype(np.int64))
        (folder / f"{i:04d}.tok").write_bytes(tokfile.dumps(tf, tok.model.codebook_size))
        files.append(tf)
    images = decode_files(tok, files)
    if images:
        save_grid(images[:grid_max], run.file("grid.png"), columns)
    return images


def generate(method, target, prior, n: int, settings, generator, batch: int = 1,
             advance=None, condition: int | None = None,
             guidance: float = 1.0) -> tuple[np.ndarray, list[list[int]], float]:
    """``n`` token sequences: (ids (n, max_tokens), tokens accepted per target step of each,
    seconds spent generating)."""
    ids, accepted, seconds = [], [], 0.0
    first = prior.model.start_id(condition)
    while len(ids) < n:
        start = time.perf_counter()
        if target is None:
            rows = sample_batch(prior.model, min(batch, n - len(ids)), settings.sampling,
                                generator, first, guidance).numpy()
            steps = [[1] * prior.model.max_tokens] * len(rows)
        else:
            g = method.generate([first], settings, generator)
            rows, steps = np.asarray([g.tokens]), [g.accepted_per_step]
        seconds += time.perf_counter() - start
        ids.extend(rows)
        accepted.extend(steps)
        if advance:
            advance(len(rows))
    return np.stack(ids), accepted, seconds


def run(cfg, run) -> dict:
    from tokctl.decode.job import build_method
    from tokctl.decode.sampling import Sampling, Settings

    n, batch = int(cfg.images), int(cfg.batch)
    if n < 1 or batch < 1:
        raise UserError(f"images={n} and batch={batch} must be at least 1")
    condition = cfg.get("condition")
    tok, prior = load_pair(cfg.tokenizer_path, cfg.prior_path, conditional=condition is not None)
    if prior.model.kind != "ids":
        raise UserError(f"{prior.path} codes FSQ digits (a prior for coding files, not one the "
                        f"decoding engine samples ids from): give prior_path= a prior over ids")
    if condition is not None and not 0 <= int(condition) < prior.model.conditions:
        raise UserError(f"condition={condition}: " + (
            f"this prior has clusters 0..{prior.model.conditions - 1}" if prior.model.conditions
            else f"{prior.path} is unconditional (train one with prior.conditions=N)"))
    guidance = float(cfg.get("guidance", 1.0))
    if guidance != 1 and condition is None:
        raise UserError(f"guidance={guidance} guides a condition: give condition= too")
    method = build_method(cfg.method)
    sampling = Sampling(float(cfg.temperature), int(cfg.top_k), float(cfg.top_p))
    settings = Settings(max_new_tokens=prior.model.max_tokens, sampling=sampling)
    batched = method.name == "ar" and batch > 1
    draft = load_draft(tok, cfg.draft_prior_path) if method.needs_draft else None
    if draft and condition is not None and draft.model.conditions != prior.model.conditions:
        raise UserError(f"condition={condition} with a draft prior needs a draft trained with the "
                        f"same prior.conditions={prior.model.conditions} (give draft_prior_path=)")
    target = None if batched else engine(method, tok, prior, draft, guidance)
    run.update_env(tokenizer=str(tok.path), tokenizer_hash=f"{tok.hash:06x}",
                   prior=str(prior.path), prior_hash=f"{prior.hash:06x}",
                   **({"draft_prior": str(draft.path), "draft_prior_hash": f"{draft.hash:06x}"}
                      if draft else {}))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    with progress_bar(f"sample ({method.name})", n) as advance:
        ids, accepted, seconds = generate(method, target, prior, n, settings, gen, batch, advance,
                                          condition, guidance)
    method.finish()  # e.g. recycling's matrix_path
    images = write_images(run, tok, ids, cfg.grid_columns)
    clusters = {} if condition is None else {
        **cluster_match(prior.model, images, int(condition)), "guidance": guidance}
    for i, steps in enumerate(accepted):
        run.append_sample({"image": i, "file": f"tokens/{i:04d}.tok", "target_steps": len(steps),
                           "mean_accepted": sum(steps) / len(steps)})
    if bool(cfg.save_png):
        for i, im in enumerate(images):
            im.save(run.file("tokens") / f"{i:04d}.png")
    tokens = ids.size
    steps = sum(len(s) for s in accepted)
    return {"method": method.name, "images": n, "tokens_per_image": int(ids.shape[1]),
            "seconds": seconds, "images_per_s": n / seconds, "tokens_per_s": tokens / seconds,
            "mean_accepted_per_step": tokens / steps, "batched": batched,
            "method_info": method.run_info(), **clusters}


def cluster_match(prior: TokenPrior, images: list[Image.Image], condition: int) -> dict:
    """How far images sampled under cluster ``condition`` follow it: the share whose colour
    layout is nearest to its centroid, against the cluster's share of the training crops."""
    from tokctl.imagetok.clusters import colour_layout, nearest

    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for im in images])
    labels = nearest(colour_layout(pixels), prior.centroids)
    return {"condition": condition, "cluster_match": float((labels == condition).float().mean()),
            "cluster_share": float(prior.cluster_share[condition])}
