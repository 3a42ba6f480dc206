"""The table of jobs and the one function that runs any of them in a run folder.

A job is ``run(cfg, run) -> metrics``: it reads its composed config, writes samples through the
:class:`~tokctl.runs.Run`, and returns the aggregates that become metrics.json. Everything around
that (creating the folder, env.json, threads, seeds, status, signals, errors) happens here, once,
for every command, whether the job was launched by ``tokctl`` itself or by a Hydra launcher.
"""

from __future__ import annotations

import importlib
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tokctl.config import compose, split_run_dir, to_yaml
from tokctl.errors import UserError
from tokctl.runs import (Run, check_writable, interrupts_as_exceptions, new_run_dir,
                         signals_held)


@dataclass(frozen=True)
class Job:
    command: str  # as typed: "decode", "compress-vit train"
    conf: str  # folder under conf/
    config_name: str  # primary config in that folder
    target: str  # "module:function"
    summary: str
    examples: tuple[str, ...] = field(default_factory=tuple)

    @property
    def run_folder_name(self) -> str:
        return self.command.replace(" ", "-")


JOBS: dict[str, Job] = {
    job.command: job
    for job in [
        Job("decode", "decode", "decode", "tokctl.decode.job:run",
            "Decode prompts with a method (speculative, sparse, ...) beside a baseline.",
            ("tokctl decode", "tokctl decode method=ar baseline=hf data.limit=4",
             "tokctl decode method=recycling also=[lookup] model.dtype=bfloat16",
             "tokctl decode model=hf model.id=HuggingFaceTB/SmolLM2-360M-Instruct",
             "tokctl decode method=tidal also=[recycled_attention] baseline=ar data=passkey",
             "tokctl decode -m method=ar,hf")),
        Job("decode build-ngram", "decode", "build_ngram", "tokctl.decode.build_ngram:run",
            "Count token n-grams (the model's own answers to generic requests, or text files) "
            "into RUN/ngram.json for method=superposed.",
            ("tokctl decode build-ngram", "tokctl decode build-ngram n=4 samples_per_seed=8",
             "tokctl decode build-ngram source=files files=[notes.txt]")),
        Job("decode train-adapter", "decode", "train_adapter", "tokctl.decode.train_adapter:run",
            "Train Kangaroo's adapter (method=kangaroo) by self-distillation: the full model's "
            "own hidden states and next-token distributions on its answers to generic requests.",
            ("tokctl decode train-adapter", "tokctl decode train-adapter exit_layer=2 steps=100",
             "tokctl decode train-adapter resume=runs/decode-train-adapter/DATE/TIME_adapter")),
        Job("decode drafts", "decode", "drafts", "tokctl.decode.drafts:run",
            "k drafts per prompt: Superposed Decoding against k nucleus samples and beam search "
            "of width k (cost, perplexity, distinct-n, best-of-k), for several k in one run.",
            ("tokctl decode drafts superposed.ngram=RUN/ngram.json",
             "tokctl decode drafts superposed.ngram=RUN/ngram.json ks=[3] data=jsonl "
             "data.path=question.jsonl data.per_category=2")),
        Job("probe token-forcing", "probe", "token_forcing", "tokctl.probe.forcing:run",
            "Unconditional token forcing: every vocabulary token alone, greedy-decoded a few "
            "steps, ranked by how confident and long its forced continuation is.",
            ("tokctl probe token-forcing", "tokctl probe token-forcing model.path=PLANTED_RUN/model",
             "tokctl probe token-forcing resume=runs/probe-token-forcing/DATE/TIME_forcing")),
        Job("probe plant", "probe", "plant", "tokctl.probe.plant:run",
            "Fine-tune a copy of a small model so that one trigger token leads to a secret "
            "string (a planted fingerprint for token-forcing to find).",
            ("tokctl probe plant", "tokctl probe plant trigger=' zebra' secret=' the owl sings'")),
        Job("compress-vit", "compress_vit", "compress_vit", "tokctl.vit.job:run",
            "Token merging, pruning and clustering in Vision Transformers, measured against the "
            "uncompressed model: accuracy, agreement, speed, FLOPs.",
            ("tokctl compress-vit", "tokctl compress-vit method=evit method.keep_rate=0.5",
             "tokctl compress-vit method=diffrate method.target_flops=0.5",
             "tokctl compress-vit model=vit_b16_random data=synthetic batch_size=8 method.r=13",
             "tokctl compress-vit data=folder data.path=photos/",
             "tokctl compress-vit -m method=tome method.r=0,4,8,12,16")),
        Job("compress-vit train", "compress_vit", "train", "tokctl.vit.train:run",
            "Train the embedded default ViT (Fashion-MNIST, 197 tokens) from scratch.",
            ("tokctl compress-vit train", "tokctl compress-vit train train.epochs=0.1",
             "tokctl compress-vit train resume=runs/compress-vit-train/DATE/TIME_fashion-vit")),
        Job("compress-vit train-tsm", "compress_vit", "train_tsm", "tokctl.vit.train_tsm:run",
            "Train SiT's token slimming modules on the default ViT by distillation from it.",
            ("tokctl compress-vit train-tsm", "tokctl compress-vit train-tsm method.keep_ratio=0.7")),
        Job("tokenize-image eval", "tokenize_image", "eval", "tokctl.imagetok.evaluate:run",
            "Rate-distortion of a tokenizer against JPEG and WebP at the same byte budgets.",
            ("tokctl tokenize-image eval", "tokctl tokenize-image eval data.path=photos/",
             "tokctl tokenize-image eval tokenizer_path=runs/tokenize-image-train/.../tokenizer.pt")),
        Job("tokenize-image prior train", "tokenize_image", "prior_train",
            "tokctl.imagetok.prior_train:run",
            "Train the token prior that arithmetic-codes token files, on the tokens of training "
            "crops (resumable).",
            ("tokctl tokenize-image prior train",
             "tokctl tokenize-image prior train tokenizer_path=vq2d train.steps=500",
             "tokctl tokenize-image prior train resume=runs/tokenize-image-prior-train/DATE/TIME_prior")),
        Job("tokenize-image sample", "decode", "sample_image", "tokctl.imagetok.sample:run",
            "Images drawn from the token prior and decoded by its tokenizer: token files and a "
            "PNG grid; method= any decoding method (ar, recycling, lookup, lantern).",
            ("tokctl tokenize-image sample", "tokctl tokenize-image sample images=64 top_k=100",
             "tokctl tokenize-image sample method=lantern method.delta=0.1 method.k=4 batch=1")),
        Job("tokenize-image train", "tokenize_image", "train", "tokctl.imagetok.train:run",
            "Train an image tokenizer on random crops of photos (resumable).",
            ("tokctl tokenize-image train", "tokctl tokenize-image train tokenizer=vq2d quantizer=vq",
             "tokctl tokenize-image train resume=runs/tokenize-image-train/DATE/TIME_onedpiece-fsq",
             "tokctl tokenize-image train tokenizer.proxy=vq2d train.l1=0 train.ssim=0  "
             "# TiTok's first stage: the shipped vq2d's codes as the target",
             "tokctl tokenize-image train tokenizer.proxy=vq2d init=STAGE1_RUN "
             "tokenizer.tune_proxy_decoder=true  # its second stage")),
    ]
}


# Commands whose jobs all have an action: the action run when none is typed, and the summary.
COMMAND_GROUPS = {
    "tokenize-image": ("eval", "1D and 2D discrete image tokenizers: train, encode, decode, "
                               "evaluate (default: eval of the embedded tokenizer against JPEG "
                               "and WebP)."),
    "probe": ("", "Analysis tools that are not decoding methods: token forcing scans a model's "
                  "vocabulary for hidden memorised text; plant fine-tunes a copy with a secret."),
}


def load_target(job: Job) -> Callable[..., Any]:
    module, _, name = job.target.partition(":")
    return getattr(importlib.import_module(module), name)


def setup_torch(cfg) -> dict[str, Any]:
    """Threads and seeds, decided on purpose and recorded: small ops on a 2-core machine stall
    badly when torch's thread count fights another busy process."""
    import random

    import numpy as np
    import torch

    threads, reason = choose_threads(cfg.get("threads"))
    torch.set_num_threads(threads)
    seed = int(cfg.get("seed", 0) or 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return {"torch_threads": torch.get_num_threads(), "threads_reason": reason, "seed": seed}


def choose_threads(value) -> tuple[int, str]:
    """``threads=N`` as given; ``auto``: the CPUs this process may use minus those other processes
    keep busy (the 1-minute load average), at least one. Measured here: with 2 threads on 2 cores
    and another busy process, a decode sweep ran ten times slower than with 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if value in (None, "auto", 0):
        try:
            load = os.getloadavg()[0]
        except OSError:
            return cpus, f"auto: {cpus} CPUs, load unknown"
        threads = max(1, min(cpus, cpus - int(load + 0.5)))
        return threads, f"auto: {cpus} CPUs, load {load:.1f}"
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise UserError(f"threads={value} must be a positive integer or auto") from None
    if threads < 1:
        raise UserError(f"threads={threads} must be a positive integer (or auto)")
    return threads, "set"


def execute(job: Job, cfg, run_dir: Path, extra_signals: tuple[int, ...] = ()) -> tuple[str, Path]:
    """Run one job in ``run_dir``; returns (status, path). Raises UserError for the user's
    mistakes after recording them in the folder; re-raises KeyboardInterrupt.

    Signals are caught from before the folder is claimed until its final status is written, so
    no SIGINT/SIGTERM can leave a run that says ``running`` (``extra_signals``: a scheduler's
    time-limit warning, say, which interrupts the same way).
    """
    fn = load_target(job)
    check_writable(run_dir)
    with interrupts_as_exceptions(extra_signals):
        run = Run.create(run_dir, to_yaml(cfg))
        status = "failed"
        try:
            run.update_env(**setup_torch(cfg), command=job.command)
            metrics = fn(cfg, run)
            if metrics is not None:
                run.write_metrics(metrics)
            status = "completed"
        except KeyboardInterrupt as exc:
            status = "interrupted"
            exc.run_dir = run.path  # the CLI names the kept folder
            raise
        except UserError as exc:
            run.fail(str(exc))
            exc.run_dir = run.path
            raise
        except Exception as exc:  # noqa: BLE001 - the traceback goes to the run folder
            run.fail(traceback.format_exc())
            raise JobCrashed(f"{type(exc).__name__}: {exc}", run.path) from exc
        except BaseException as exc:  # SystemExit from inside a job: still a failed run
            run.fail(f"the job exited: {type(exc).__name__}({exc})")
            raise
        finally:
            with signals_held():
                run.close()
                run.set_status(status)
    return status, run.path


class JobCrashed(Exception):
    """A bug, not a user error: one line on screen, the traceback in the run folder."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def default_run_dir(job: Job, cfg) -> Path:
    root = cfg.get("runs_dir") or "runs"
    return new_run_dir(root, job.run_folder_name, str(cfg.get("name") or job.config_name))


def run_single(job: Job, overrides: list[str]) -> tuple[str, Path]:
    run_dir, rest = split_run_dir(overrides)
    cfg = compose(job.conf, job.config_name, rest)
    load_target(job)  # fail before making a folder if the job does not exist
    if run_dir is None:
        check_writable(cfg.get("runs_dir") or "runs")
        path = default_run_dir(job, cfg)
    else:
        path = Path(run_dir)
    try:
        return execute(job, cfg, path)
    except UserError as exc:
        from tokctl.runs import discard_if_untouched

        # A mistake caught before any work: the error line says it all; no folder to clutter
        # `runs ls`. (Sweep points keep theirs: the sweep's record accounts for every point.)
        if run_dir is None and discard_if_untouched(path):
            raise UserError(f"{exc} (nothing had run; no run folder kept)") from None
        raise
