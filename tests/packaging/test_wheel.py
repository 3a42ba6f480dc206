"""The wheel carries the configs (as tokctl/_conf) and the kernels (as tokctl.kernels, its only top-level name), so an installed tokctl finds
them without a source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_contains_configs_and_kernels(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT),
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("tokctl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tokctl/_conf/decode/decode.yaml" in names
    assert "tokctl/_conf/decode/method/recycling.yaml" in names
    assert "tokctl/kernels/tree_attention.py" in names
    # one top-level import name: a top-level `kernels` would shadow Hugging Face's `kernels`
    # distribution, which transformers probes for.
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"tokctl"}, top_level
    assert "tokctl/decode/prompts/builtin.jsonl" in names
    # method=kangaroo's adapter=auto and method=s2d's shipped adapters
    assert "tokctl/decode/adapters/smollm2-135m-kangaroo.safetensors" in names
    assert "tokctl/decode/adapters/smollm2-135m-kangaroo-L8.safetensors" in names


def test_conf_root_prefers_the_packed_copy(tmp_path, monkeypatch):
    import tokctl.config as config

    monkeypatch.delenv(config.CONF_ENV, raising=False)
    fake_pkg = tmp_path / "tokctl"
    (fake_pkg / "_conf" / "decode").mkdir(parents=True)
    monkeypatch.setattr(config, "__file__", str(fake_pkg / "config.py"))
    assert config.conf_root() == (fake_pkg / "_conf").resolve()
    monkeypatch.setenv(config.CONF_ENV, str(tmp_path))
    assert config.conf_root() == tmp_path.resolve()
