"""Check every Triton kernel in tokctl/kernels/ against its torch reference and time both, on a GPU.

    python bench/kernels.py                 # every kernel module, every case
    python bench/kernels.py --only nearest_code --repeats 200 --json bench.json

Each module ``tokctl/kernels/<name>.py`` exposes ``bench_cases(device) -> [(label, triton_fn, ref_fn)]``:
a realistic shape described by ``label`` and two zero-argument callables on the same inputs.
Per case this script runs both once and compares the outputs (tensors, or tuples/lists/dicts/
dataclasses of them: floats within a tolerance scaled to the reference's magnitude, integers
exactly up to ``--index-mismatch``, for near-tied argmins), then times each: warm-up calls,
then ``--repeats`` calls each between CUDA events, the L2 cache flushed before every call, and
reports the median (and quartiles) in milliseconds and the speedup, reference over Triton.

On a machine without CUDA it says so and exits 0: there the kernels' Triton paths run only in
Triton's interpreter (tests/, for correctness), which says nothing about speed. Exit status 1
when any case disagrees or fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import pkgutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- comparing
@dataclass
class Agreement:
    ok: bool
    detail: str  # "max abs err 3e-06 (tolerance 1e-04)" or what differs


# Tolerance (relative to the largest reference magnitude, plus an absolute floor) per dtype.
FLOAT_TOLERANCE = {"float64": (1e-9, 1e-12), "float32": (1e-4, 1e-6), "float16": (1e-2, 1e-4),
                   "bfloat16": (2e-2, 1e-3)}


def leaves(obj: Any, path: str = "out") -> list[tuple[str, Any]]:
    """The tensors and numbers inside an output, with where they are."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [x for f in dataclasses.fields(obj)
                for x in leaves(getattr(obj, f.name), f"{path}.{f.name}")]
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in leaves(obj[k], f"{path}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        return [x for i, v in enumerate(obj) for x in leaves(v, f"{path}[{i}]")]
    return [(path, obj)]


def compare(out: Any, ref: Any, index_mismatch: float = 1e-3, scale: float = 1.0) -> Agreement:
    """Whether the Triton output matches the reference's (``scale`` multiplies tolerances)."""
    import torch

    a, b = leaves(out), leaves(ref)
    if [p for p, _ in a] != [p for p, _ in b]:
        return Agreement(False, f"different structure: {[p for p, _ in a]} vs {[p for p, _ in b]}")
    worst, notes = 0.0, []
    for (where, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return Agreement(False, f"{where}: a tensor on one side only")
        if not isinstance(x, torch.Tensor):
            if isinstance(x, float) or isinstance(y, float):
                if not math.isclose(float(x), float(y), rel_tol=1e-6 * scale, abs_tol=1e-9):
                    return Agreement(False, f"{where}: {x} vs {y}")
            elif x != y:
                return Agreement(False, f"{where}: {x!r} vs {y!r}")
            continue
        if tuple(x.shape) != tuple(y.shape):
            return Agreement(False, f"{where}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.dtype.is_floating_point or y.dtype.is_floating_point:
            xf, yf = x.detach().double(), y.detach().double()
            if not (torch.isfinite(xf) == torch.isfinite(yf)).all():
                return Agreement(False, f"{where}: inf/nan in different places")
            fin = torch.isfinite(yf)
            if not fin.any():
                continue
            dtype = str(y.dtype).replace("torch.", "")
            rtol, atol = FLOAT_TOLERANCE.get(dtype, FLOAT_TOLERANCE["float32"])
            magnitude = yf[fin].abs().max().item()
            err = (xf[fin] - yf[fin]).abs().max().item()
            tol = scale * (atol + rtol * magnitude)
            if err > tol:
                return Agreement(False, f"{where}: max abs err {err:.3g} > {tol:.3g} "
                                        f"({dtype}, reference up to {magnitude:.3g})")
            worst = max(worst, err / max(magnitude, 1e-30))
        else:
            wrong = (x.detach().cpu() != y.detach().cpu()).sum().item()
            if wrong > index_mismatch * max(1, y.numel()):
                return Agreement(False, f"{where}: {wrong} of {y.numel()} values differ")
            if wrong:
                notes.append(f"{where}: {wrong}/{y.numel()} differ")
    detail = f"max rel err {worst:.1e}" + (f"; {'; '.join(notes)}" if notes else "")
    return Agreement(True, detail)


# ----------------------------------------------------------------------------------- timing
def cuda_timer(warmup: int, repeats: int, flush_l2: bool = True) -> Callable[[Callable], list[float]]:
    """Milliseconds of each of ``repeats`` calls, timed with CUDA events after ``warmup`` calls;
    the L2 cache is overwritten before each call so a small case is not timed from cache."""
    import torch

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if flush_l2 else None

    def time_ms(fn: Callable) -> list[float]:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(repeats):
            if flush is not None:
                flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    return time_ms


def wall_timer(warmup: int, repeats: int) -> Callable[[Callable], list[float]]:
    """The same on a CPU (dry runs of this script): wall-clock milliseconds per call."""

    from tokctl import measure

    def time_ms(fn: Callable) -> list[float]:
        return [1e3 * s for s in measure.round_robin({"fn": fn}, repeats, warmup)["fn"]]

    return time_ms


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    from tokctl import measure  # tokctl's one quantile definition

    return measure.quantiles(xs)


# ------------------------------------------------------------------------------------ cases
@dataclass
class CaseResult:
    module: str
    label: str
    agree: bool | None = None
    detail: str = ""
    triton_ms: tuple[float, float, float] | None = None  # q1, median, q3
    ref_ms: tuple[float, float, float] | None = None
    error: str | None = None
    skipped: str | None = None  # a module without bench cases: reported, not a failure

    @property
    def speedup(self) -> float | None:
        if self.triton_ms and self.ref_ms and self.triton_ms[1] > 0:
            return self.ref_ms[1] / self.triton_ms[1]
        return None


@dataclass
class Options:
    device: str = "cuda"
    warmup: int = 10
    repeats: int = 50
    index_mismatch: float = 1e-3
    tolerance_scale: float = 1.0
    time_fn: Callable[[Callable], list[float]] | None = None
    only: list[str] = field(default_factory=list)


def kernel_modules(package: str = "tokctl.kernels") -> list[str]:
    try:
        pkg = importlib.import_module(package)
    except ImportError as exc:
        raise SystemExit(f"error: cannot import the kernels package {package!r}: {exc}") from None
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def run_module(package: str, name: str, opts: Options) -> list[CaseResult]:
    try:
        module = importlib.import_module(f"{package}.{name}")
    except Exception as exc:  # noqa: BLE001 - one broken module must not hide the others
        return [CaseResult(name, "-", error=f"import failed: {type(exc).__name__}: {exc}")]
    cases_fn = getattr(module, "bench_cases", None)
    if cases_fn is None:
        return [CaseResult(name, "-", skipped="no bench_cases(device) in this module yet")]
    try:
        cases = list(cases_fn(opts.device))
    except Exception as exc:  # noqa: BLE001
        return [CaseResult(name, "-", error=f"bench_cases failed: {type(exc).__name__}: {exc}")]
    if not cases:
        return [CaseResult(name, "-", error="bench_cases returned no case")]
    return [run_case(name, case, opts) for case in cases]


def run_case(module: str, case, opts: Options) -> CaseResult:
    try:
        label, triton_fn, ref_fn = case
    except (TypeError, ValueError):
        return CaseResult(module, "?", error="a case must be (label, triton_fn, ref_fn)")
    result = CaseResult(module, str(label))
    try:
        agreement = compare(triton_fn(), ref_fn(), opts.index_mismatch, opts.tolerance_scale)
        result.agree, result.detail = agreement.ok, agreement.detail
        if opts.time_fn is not None and agreement.ok:  # a wrong kernel's speed means nothing
            result.triton_ms = quartiles(opts.time_fn(triton_fn))
            result.ref_ms = quartiles(opts.time_fn(ref_fn))
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory at this shape
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        result.detail = traceback.format_exc(limit=3)
    finally:
        _free_memory(opts.device)
    return result


def _free_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run(package: str, opts: Options) -> list[CaseResult]:
    names = kernel_modules(package)
    if opts.only:
        unknown = sorted(set(opts.only) - set(names))
        if unknown:
            raise SystemExit(f"error: no kernel module {', '.join(unknown)} in {package}/ "
                             f"(there: {', '.join(names) or 'none'})")
        names = [n for n in names if n in opts.only]
    results = []
    for name in names:
        results.extend(run_module(package, name, opts))
    return results


# ---------------------------------------------------------------------------------- output
def _ms(q: tuple[float, float, float] | None) -> str:
    if q is None:
        return "-"
    return f"{q[1]:.4g} [{q[0]:.3g}-{q[2]:.3g}]"


def print_table(results: list[CaseResult], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for col, justify in (("kernel", "left"), ("case", "left"), ("agrees", "left"),
                         ("triton ms", "right"), ("torch ms", "right"), ("speedup", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in results:
        if r.skipped:
            agrees = f"[yellow]skipped[/]: {escape(r.skipped)}"
        elif r.error:
            agrees = f"[red]error[/]: {escape(r.error)}"
        elif r.agree:
            agrees = f"[green]yes[/] ({escape(r.detail)})"
        else:
            agrees = f"[red]NO[/]: {escape(r.detail)}"
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        table.add_row(escape(r.module), escape(r.label), agrees, escape(_ms(r.triton_ms)),
                      escape(_ms(r.ref_ms)), speed)
    Console(highlight=False).print(table)


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="kernel modules to run (default: all)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported")
    ap.add_argument("--no-flush", action="store_true", help="do not flush the L2 cache between calls")
    ap.add_argument("--index-mismatch", type=float, default=1e-3,
                    help="fraction of integer outputs (argmin indices) allowed to differ")
    ap.add_argument("--tolerance-scale", type=float, default=1.0,
                    help="multiply the float tolerances (fp32 1e-4, bf16 2e-2 of the magnitude)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--package", default="tokctl.kernels", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run on the CPU anyway (Triton interpreter; correctness only, very slow)")
    args = ap.parse_args(argv)

    if args.cpu_dry_run:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("TOKCTL_TRITON", "1")
    # Run as a script, this file's folder comes first on sys.path and its own name would
    # shadow other packages: look in the repository (or the installed package) instead.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(ROOT))
    import torch

    if torch.cuda.is_available() and not args.cpu_dry_run:
        device, timer = "cuda", cuda_timer(args.warmup, args.repeats, not args.no_flush)
    elif args.cpu_dry_run:
        device, timer = "cpu", wall_timer(min(args.warmup, 1), min(args.repeats, 3))
    else:
        print("bench/kernels.py: no CUDA device here, so nothing to benchmark: Triton kernels are "
              "timed on a GPU only (on this machine their Triton paths run in Triton's "
              "interpreter, in the tests, for correctness). Use --cpu-dry-run to check agreement "
              "anyway.")
        return 0
    opts = Options(device=device, warmup=args.warmup, repeats=args.repeats,
                   index_mismatch=args.index_mismatch, tolerance_scale=args.tolerance_scale,
                   time_fn=timer, only=list(args.only))
    env = environment(device)
    results = run(args.package, opts)
    title = (f"kernels against their torch references on {env.get('gpu', device)} "
             f"(torch {env['torch']}, triton {env['triton']}; median [q1-q3] of "
             f"{args.repeats if device == 'cuda' else 3} calls)")
    print_table(results, title)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": [
            {**dataclasses.asdict(r), "speedup": r.speedup} for r in results]}, indent=2))
    bad = [r for r in results if r.error or r.agree is False]
    if bad:
        print(f"{len(bad)} of {len(results)} case(s) failed or disagreed", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
