"""Run folders as one pandas table: what `tokctl runs ls/show/compare` and `tokctl report` read.

One row per run folder: ``path``, ``command``, ``status``, ``n`` (samples or images), ``group``
(0 completed, 1 incomplete, 2 failed), then ``config.<key>`` and ``metrics.<key>`` flattened by
:func:`pandas.json_normalize`. Each command names its headline metrics here, on purpose, with how
to print them and which way is better; a few are derived from nested metrics (tokenize-image
eval's per-codec ``entries``), so that every command has scalar headlines to rank by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from tokctl.errors import UserError
from tokctl.runs import find_runs, read_json, read_samples, read_status

COMPLETE, INCOMPLETE, FAILED = 0, 1, 2  # the groups runs are ranked within, in this order
GROUP_NAMES = {COMPLETE: "completed", INCOMPLETE: "incomplete", FAILED: "failed"}
# Config keys that differ between runs without making them different experiments.
NOT_A_SETTING = ("name", "runs_dir")


@dataclass(frozen=True)
class Metric:
    header: str  # column header: short, so that a table fits 80 columns
    spec: str = "{:.3g}"  # how a value prints
    lower_is_better: bool = False
    note: str = ""  # what the header means, for the table's caption


# Every metric a table may show by name; others print with their key and a generic format.
METRICS: dict[str, Metric] = {
    "speedup": Metric("speedup", "{:.2f}x", note="speedup: throughput over the baseline's, "
                                                  "measured in the same run"),
    "speedup_median": Metric("median", "{:.2f}x"),
    "speedup_q25": Metric("q25", "{:.2f}x"),
    "speedup_q75": Metric("q75", "{:.2f}x"),
    "baseline_tokens_per_s": Metric("baseline tok/s", "{:.1f}"),
    "num_samples": Metric("prompts", "{:.0f}"),
    "baseline_top1": Metric("baseline top-1", "{:.1%}"),
    "baseline_images_per_s": Metric("baseline img/s", "{:.1f}"),
    "mean_accepted_tokens": Metric("tok/step", "{:.2f}", note="tok/step: new tokens per target "
                                                               "forward pass"),
    "identical_to_baseline": Metric("identical", "{:.0%}", note="identical: share of outputs equal "
                                                                "to the baseline's"),
    "tokens_per_s": Metric("tok/s", "{:.1f}"),
    "top1": Metric("top-1", "{:.1%}"),
    "agreement": Metric("agree", "{:.1%}", note="agree: top-1 agreement with the uncompressed "
                                                "model"),
    "gflops": Metric("GFLOPs", "{:.3g}", lower_is_better=True),
    "flops_ratio": Metric("FLOPs", "{:.2f}", lower_is_better=True),
    "images_per_s": Metric("img/s", "{:.1f}"),
    "tokens": Metric("tokens", "{:.0f}"),
    "bytes_per_image": Metric("bytes", "{:.0f}", lower_is_better=True,
                              note="bytes: exact file size per image"),
    "ssim": Metric("SSIM", "{:.3f}"),
    "psnr": Metric("PSNR dB", "{:.2f}"),
    "ms_ssim": Metric("MS-SSIM", "{:.3f}"),
    "rfid": Metric("rFID", "{:.1f}", lower_is_better=True),
    "jpeg_ssim": Metric("JPEG SSIM", "{:.3f}"),
    "webp_ssim": Metric("WebP SSIM", "{:.3f}"),
    "test_top1": Metric("test top-1", "{:.1%}"),
    "student_top1": Metric("student top-1", "{:.1%}"),
    "teacher_top1": Metric("teacher top-1", "{:.1%}"),
    "val_ssim": Metric("val SSIM", "{:.3f}"),
    "val_psnr": Metric("val PSNR", "{:.2f}"),
    "steps": Metric("steps", "{:.0f}"),
}
# Ranking puts the largest first, except for these (and the METRICS marked lower_is_better).
LOWER_IS_BETTER = ("time_s", "baseline_time_s", "kl", "loss", "val_loss", "failed_samples",
                   "images_skipped")

# Each command's headline metrics, the first present one ranking the runs.
HEADLINE: dict[str, tuple[str, ...]] = {
    "decode": ("speedup", "mean_accepted_tokens", "identical_to_baseline"),
    "compress-vit": ("top1", "agreement", "speedup", "gflops"),
    "tokenize-image eval": ("ssim", "psnr", "rfid", "bytes_per_image", "tokens"),
    "compress-vit train": ("test_top1", "steps"),
    "compress-vit train-tsm": ("student_top1", "teacher_top1", "steps"),
    "tokenize-image train": ("val_ssim", "val_psnr", "steps"),
}
# What a run's size is counted in (shown as ``n``): samples.jsonl lines otherwise.
SIZE_KEYS = {"decode": "num_samples", "compress-vit": "num_images", "tokenize-image eval": "images"}
SIZE_NAMES = {"decode": "prompts", "compress-vit": "images", "tokenize-image eval": "images"}
# Commands that are one job under two names.
ALIASES = {"tokenize-image": "tokenize-image eval"}


def lower_is_better(key: str) -> bool:
    last = key.split(".")[-1]
    return (METRICS[last].lower_is_better if last in METRICS else last in LOWER_IS_BETTER)


def header(key: str) -> str:
    return METRICS[key].header if key in METRICS else key


def fmt(v: Any, key: str | None = None) -> str:
    """A value as a table prints it: with its metric's format where known, else compactly."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if key in METRICS and isinstance(v, (int, float)):
        return METRICS[key].spec.format(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 0.01:
            return f"{v:.3g}"
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


# ------------------------------------------------------------------------------- one run's files
def load_config(run: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)
    except Exception as exc:  # noqa: BLE001 - one damaged file must not hide the other runs
        from tokctl.console import err_console

        err_console.print(f"[yellow]warning:[/] {run / 'config.yaml'} does not parse ({exc}); "
                          f"its settings are left blank", soft_wrap=True)
        return {}


def command_of(run: Path) -> str:
    env = read_json(run / "env.json") or {}
    command = env.get("command")
    if not command:
        from tokctl.jobs import JOBS

        folders = {job.run_folder_name: job.command for job in JOBS.values()}
        command = next((folders[p] for p in reversed(run.parts) if p in folders),
                       run.parent.parent.name)
    return ALIASES.get(command, command)


def derived(command: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar headlines a command keeps nested: tokenize-image eval's first tokenizer at its full
    length (with JPEG's and WebP's SSIM at the same byte budget) and every entry as
    ``<codec>@<tokens or bytes>.<metric>``; the training runs' last validation at the most tokens."""
    out: dict[str, Any] = {}
    entries = metrics.get("entries")
    if isinstance(entries, list) and entries:
        for e in entries:
            n = e.get("tokens") if e.get("kind") == "tokenizer" else e.get("bytes_target")
            for k in ("ssim", "psnr", "ms_ssim", "rfid", "bytes_per_image"):
                out[f"{e.get('codec')}@{n}.{k}"] = e.get(k)
        first = (metrics.get("tokenizers") or [{}])[0].get("label")
        mine = [e for e in entries if e.get("kind") == "tokenizer"
                and (first is None or e.get("codec") == first)]
        if mine:
            full = max(mine, key=lambda e: e.get("tokens") or 0)
            out.update({k: full.get(k) for k in ("tokens", "bytes_per_image", "ssim", "psnr",
                                                 "ms_ssim", "rfid")})
            budget = full.get("bytes_target", round(full.get("bytes_per_image") or 0))
            for e in entries:
                if e.get("kind") == "classical" and e.get("bytes_target") == budget:
                    out[f"{e['codec']}_ssim"] = e.get("ssim")
    val = {k: v for k, v in metrics.items() if k.startswith("val_") and "@" in k}
    if val:
        most = max(int(k.split("@")[1]) for k in val if k.split("@")[1].isdigit())
        out.update(val_ssim=metrics.get(f"val_ssim@{most}"), val_psnr=metrics.get(f"val_psnr@{most}"),
                   val_tokens=most)
    return out


def group_of(status: str | None) -> int:
    if status == "completed":
        return COMPLETE
    return FAILED if status == "failed" else INCOMPLETE


def record(run: Path) -> dict[str, Any]:
    """Everything the tables need from one run folder, nested as in its files."""
    command = command_of(run)
    metrics = read_json(run / "metrics.json") or {}
    if not isinstance(metrics, dict):
        metrics = {}
    metrics = {**metrics, **{k: v for k, v in derived(command, metrics).items() if k not in metrics}}
    samples = len(read_samples(run))
    size = metrics.get(SIZE_KEYS.get(command, ""))
    status = read_status(run)
    return {"path": str(run), "command": command, "status": status, "group": group_of(status),
            "samples": samples, "n": size if isinstance(size, int) else samples,
            "config": load_config(run), "metrics": metrics}


# ------------------------------------------------------------------------------------ the table
def runs_in(paths: Iterable[Path]) -> list[Path]:
    """The run folders in or below ``paths``, each once, in their given order."""
    runs: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"no such run folder: {p}")
        found = find_runs(p)
        if not found:
            raise UserError(f"{p} holds no run folder (no status and config.yaml inside)")
        runs.extend(r for r in found if r not in runs)
    return runs


def frame(runs: list[Path]) -> pd.DataFrame:
    """One row per run; nested config and metrics flattened to ``config.a.b`` / ``metrics.x``."""
    records = [record(r) for r in runs]
    if not records:
        return pd.DataFrame(columns=["path", "command", "status", "group", "samples", "n"])
    df = pd.json_normalize(records, sep=".")
    # json_normalize leaves an empty dict as a column of {}: no such setting/metric
    return df.drop(columns=[c for c in ("config", "metrics") if c in df.columns])


def grid_order(df: pd.DataFrame) -> pd.DataFrame:
    """Sweep points in their grid's order (2 before 10), other runs by folder name (time)."""
    paths = df["path"].map(Path)
    key = pd.DataFrame({"parent": paths.map(lambda p: str(p.parent)),
                        "point": paths.map(lambda p: int(p.name) if p.name.isdigit() else -1),
                        "name": paths.map(lambda p: p.name)}, index=df.index)
    return df.loc[key.sort_values(["parent", "point", "name"], kind="stable").index]


def column(df: pd.DataFrame, prefix: str, key: str) -> pd.Series:
    name = f"{prefix}.{key}"
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index,
                                                          dtype=object)


def present(df: pd.DataFrame, prefix: str, key: str) -> bool:
    name = f"{prefix}.{key}"
    return name in df.columns and df[name].notna().any()


def headline_metrics(df: pd.DataFrame, command: str) -> list[str]:
    """The command's headline metrics that some run has; else its first few scalar ones."""
    keys = [k for k in HEADLINE.get(command, ()) if present(df, "metrics", k)]
    if keys:
        return keys
    scalar = [c[len("metrics."):] for c in df.columns if c.startswith("metrics.")
              and c.count(".") == 1 and df[c].map(_is_scalar).all() and df[c].notna().any()]
    return scalar[:4]


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def numeric(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s.map(lambda v: float(v) if isinstance(v, bool) else v), errors="coerce")


def rank(df: pd.DataFrame, by: str | None, ascending: bool | None = None,
         then: list[str] = ()) -> pd.DataFrame:
    """Completed runs first, best first by ``by``; then incomplete, then failed ones, each group
    in the same order; runs without the metric last in their group. Ties are broken by the
    metrics ``then`` (each its own way round), then keep the grid's order.
    Adds ``rank``: 1, 2, ... for the completed runs, None for the others."""
    df = grid_order(df)
    if ascending is None:
        ascending = lower_is_better(by) if by else True
    keys = {}
    for i, (metric, up) in enumerate([(by, ascending)] + [(m, lower_is_better(m)) for m in then]):
        if metric:
            key = numeric(column(df, "metrics", metric))
            keys[f"_key{i}"] = key if up else -key
    df = df.assign(**keys)
    df = df.sort_values(["group", *keys], na_position="last", kind="stable").drop(columns=list(keys))
    done = df["group"] == COMPLETE
    ranks = pd.Series([None] * len(df), index=df.index, dtype=object)
    ranks[done] = range(1, int(done.sum()) + 1)
    return df.assign(rank=ranks)


def short_path(run: Path | str) -> str:
    """The folder name, with its sweep's when it is a sweep point (``10-02-03_sweep/3``)."""
    run = Path(run)
    return f"{run.parent.name}/{run.name}" if run.name.isdigit() else run.name


def common_parent(paths: list[str]) -> Path | None:
    import os

    if not paths:
        return None
    parent = Path(os.path.commonpath([str(Path(p).absolute()) for p in paths]))
    if len(paths) == 1:
        parent = parent.parent
    try:
        return parent.relative_to(Path.cwd())
    except ValueError:
        return parent


# ---------------------------------------------------------------------------------- settings
def configs(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Each run's flat config (``method.r`` -> 8), without the keys it does not have."""
    cols = [c for c in df.columns if c.startswith("config.")]
    return [{c[len("config."):]: v for c, v in row.items() if not _missing(v)}
            for row in df[cols].to_dict("records")]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if k not in NOT_A_SETTING and not k.endswith("_target_")
            and not k.startswith("hydra.")
            and len({json.dumps(c.get(k), default=str, sort_keys=True) for c in configs}) > 1]


@dataclass
class Settings:
    """The config keys that tell runs apart. A key only some runs have (a method's own option)
    counts only where it differs between runs of that same method: ``recycling`` against
    ``lookup`` needs no more words than their names. ``method.name`` is always part of a run's
    name, varying or not (``tome, r=8``)."""

    keys: list[str]  # names first, then the methods' own options, then the rest
    names: list[str]  # method.name and the like
    shared: list[str]  # differing keys every run has
    own: dict[tuple, list[str]]  # per kind of run (its names): its options that differ

    @classmethod
    def of(cls, configs: list[dict[str, Any]]) -> "Settings":
        keys = varying_keys(configs)
        if any("method.name" in c for c in configs) and "method.name" not in keys:
            keys.insert(0, "method.name")
        names = [k for k in keys if k.endswith(".name") or k == "method"]
        groups = tuple(k[: -len("name")] for k in names if k.endswith(".name"))  # "method."
        keys.sort(key=lambda k: 0 if k in names else 1 if k.startswith(groups) else 2)
        shared = [k for k in keys if all(c.get(k) is not None for c in configs)]
        settings = cls(keys, names, shared, {})
        for kind in {settings.kind(c) for c in configs}:
            members = [c for c in configs if settings.kind(c) == kind]
            settings.own[kind] = [k for k in varying_keys(members) if k not in shared]
        return settings

    def kind(self, config: dict[str, Any]) -> tuple:
        return tuple(str(config.get(k)) for k in self.names)

    def of_run(self, config: dict[str, Any]) -> list[str]:
        own = self.own.get(self.kind(config), [])
        return [k for k in self.keys if k in self.shared or k in own]

    def columns(self) -> list[str]:
        own = {k for ks in self.own.values() for k in ks}
        return [k for k in self.keys if k in self.shared or k in own]

    def label(self, config: dict[str, Any]) -> str:
        shown = self.of_run(config)
        last = [k.split(".")[-1] for k in shown]
        parts = []
        for k, short in zip(shown, last):
            v = config.get(k)
            if v is None:  # a setting this run's method does not have
                continue
            if k in self.names:
                parts.append(str(v))
            else:
                parts.append(f"{short if last.count(short) == 1 else k}={short_value(v)}")
        return ", ".join(parts)


def short_value(v: Any) -> str:
    """A path shown by its last two parts: the label of a run, not its address."""
    if isinstance(v, str) and "/" in v.strip("/"):
        return "/".join(Path(v).parts[-2:])
    return fmt(v)


def labels(df: pd.DataFrame) -> pd.Series:
    """Each run named by the settings that set it apart (``tome, r=8``); the folder otherwise.
    Two runs with the same settings get ``#2``, ``#3``."""
    cfgs = configs(df)
    settings = Settings.of(cfgs)
    names = [settings.label(c) or short_path(p) for c, p in zip(cfgs, df["path"])]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return pd.Series(out, index=df.index, dtype=object)
