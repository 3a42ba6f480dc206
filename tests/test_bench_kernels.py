"""bench/kernels.py: the CPU message, and its agreement checks on dummy kernel modules."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_kernels"]


DUMMY = {
    "__init__.py": "",
    "agrees.py": '''
import torch
from collections import namedtuple
Out = namedtuple("Out", "index dist")
def bench_cases(device):
    x = torch.randn(37, 5, device=device)
    ref = lambda: Out(x.argmax(1), x.max(1).values)
    near = lambda: Out(x.argmax(1), x.max(1).values * (1 + 1e-7))  # float rounding: fine
    return [("37x5 fp32", near, ref), ("same fn", ref, ref)]
''',
    "wrong_value.py": '''
import torch
def bench_cases(device):
    x = torch.randn(64, device=device)
    return [("off by 1e-2", lambda: x + 1e-2, lambda: x)]
''',
    "wrong_index.py": '''
import torch
def bench_cases(device):
    i = torch.arange(1000, device=device)
    j = i.clone(); j[:5] = 0
    return [("5 of 1000 indices", lambda: j, lambda: i)]
''',
    "wrong_shape.py": '''
import torch
def bench_cases(device):
    return [("shape", lambda: torch.zeros(3, 4), lambda: torch.zeros(4, 3))]
''',
    "crashes.py": '''
def bench_cases(device):
    def boom():
        raise RuntimeError("CUDA out of memory (pretend)")
    return [("too big", boom, lambda: 0)]
''',
    "no_cases.py": "def helper(): pass\n",
    "broken.py": "raise ImportError('triton too old')\n",
}


@pytest.fixture
def dummy_kernels(tmp_path, monkeypatch):
    pkg = tmp_path / "dummy_kernels"
    pkg.mkdir()
    for name, text in DUMMY.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "dummy_kernels"
    for mod in [m for m in sys.modules if m.startswith("dummy_kernels")]:
        del sys.modules[mod]


def test_on_a_cpu_machine_it_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stdout and proc.stderr == ""


def test_every_module_is_checked_and_disagreements_are_named(bench, dummy_kernels):
    calls = []

    def fake_timer(fn):
        calls.append(fn)
        return [2.0, 1.0, 3.0]

    opts = bench.Options(device="cpu", time_fn=fake_timer)
    results = {(r.module, r.label): r for r in bench.run(dummy_kernels, opts)}
    assert results[("agrees", "37x5 fp32")].agree is True
    assert results[("agrees", "same fn")].agree is True
    assert results[("agrees", "same fn")].triton_ms == (1.5, 2.0, 2.5)
    assert results[("agrees", "same fn")].speedup == 1.0
    off = results[("wrong_value", "off by 1e-2")]
    assert off.agree is False and "max abs err" in off.detail
    assert results[("wrong_index", "5 of 1000 indices")].agree is False
    assert "shape (3, 4) vs (4, 3)" in results[("wrong_shape", "shape")].detail
    assert "out of memory" in results[("crashes", "too big")].error
    assert results[("no_cases", "-")].skipped and results[("no_cases", "-")].error is None
    assert "import failed" in results[("broken", "-")].error
    # the two agreeing cases are timed, both sides; a wrong kernel's speed means nothing
    assert len(calls) == 2 * 2 and results[("wrong_value", "off by 1e-2")].triton_ms is None


def test_tolerances(bench):
    x = torch.randn(100, dtype=torch.float32)
    assert bench.compare(x * (1 + 1e-6), x).ok
    assert not bench.compare(x * (1 + 1e-2), x).ok
    h = x.bfloat16()
    assert bench.compare((x * (1 + 5e-3)).bfloat16(), h).ok  # bf16 rounding is coarse
    idx = torch.arange(10_000)
    near_tie = idx.clone()
    near_tie[0] = 1
    assert bench.compare(near_tie, idx).ok  # 1 in 10,000: allowed by default
    assert not bench.compare(near_tie, idx, index_mismatch=0).ok
    assert not bench.compare((x, x), [x]).ok
    assert bench.compare({"a": x, "b": 3}, {"a": x.clone(), "b": 3}).ok
    inf = torch.tensor([1.0, float("inf")])
    assert bench.compare(inf.clone(), inf).ok
    assert not bench.compare(torch.tensor([1.0, 2.0]), inf).ok


def test_main_reports_failures_in_its_exit_status(bench, dummy_kernels, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TOKCTL_TRITON", "1")  # --cpu-dry-run sets it: undone after this test
    code = bench.main(["--cpu-dry-run", "--package", dummy_kernels, "--only", "agrees"])
    assert code == 0
    assert "37x5 fp32" in capsys.readouterr().out
    assert bench.main(["--cpu-dry-run", "--package", dummy_kernels, "--only", "wrong_value"]) == 1
    with pytest.raises(SystemExit, match="no kernel module nope"):
        bench.main(["--cpu-dry-run", "--package", dummy_kernels, "--only", "nope"])
