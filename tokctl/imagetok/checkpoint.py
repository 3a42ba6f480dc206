"""Building tokenizers from config, and saving / loading them as one self-describing file.

A tokenizer file (``*.pt``) holds ``format``, ``tokenizer`` (the config: ``_target_`` and
arguments, the quantiser nested under ``quantizer``), ``state_dict`` (fp16 for shipping) and
``trained`` (steps, images, the command that produced it). Training checkpoints (``checkpoint.pt``
in a run folder) hold the same keys plus the optimiser state, so either loads for encode/decode.
The embedded default lives in ``tokctl/imagetok/weights/default.pt``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from tokctl.errors import UNREADABLE_FILE, UserError, one_line_error
from tokctl.imagetok.models.base import ImageTokenizer

FORMAT = "tokctl-imagetok/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_TOKENIZER = WEIGHTS_DIR / "default.pt"
# The tokenizers that ship inside tokctl, by the names --tokenizer and tokenizer_path= also take.
EMBEDDED = {"default": DEFAULT_TOKENIZER, "vq2d": WEIGHTS_DIR / "vq2d.pt",
            "vq2d24": WEIGHTS_DIR / "vq2d24.pt", "vq2d32": WEIGHTS_DIR / "vq2d32.pt",
            "onedpiece128": WEIGHTS_DIR / "onedpiece128.pt"}


def embedded_path(path: Path | str | None) -> Path:
    """``path`` itself, or the shipped file a name stands for (an existing path wins)."""
    if not path:
        return DEFAULT_TOKENIZER
    if str(path) in EMBEDDED and not Path(path).exists():
        return EMBEDDED[str(path)]
    return Path(path)


def build_tokenizer(config: dict[str, Any]) -> ImageTokenizer:
    """``config``: the tokenizer's config with the quantiser's under ``quantizer``."""
    from hydra.utils import instantiate

    from hydra.errors import InstantiationException

    from tokctl.errors import one_line

    config = {k: v for k, v in config.items() if k != "name"}
    quant = {k: v for k, v in config.pop("quantizer").items() if k != "name"}
    try:
        return instantiate(config, quantizer=instantiate(quant, _convert_="all"), _convert_="all",
                           _recursive_=False)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise UserError(f"cannot build the tokenizer: {one_line(str(cause))}") from None


def tokenizer_config(cfg) -> dict[str, Any]:
    """The tokenizer + quantizer part of a composed job config, as plain data."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    out["quantizer"] = OmegaConf.to_container(cfg.quantizer, resolve=True)
    return out


def tokenizer_hash(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> int:
    """24-bit identity of a tokenizer: its config and its (fp16) weights. Token files carry it,
    so tokens are never decoded by a tokenizer that did not make them."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().to(torch.float16).cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:3], "big")


def save_tokenizer(path: Path | str, model: ImageTokenizer, config: dict[str, Any],
                   trained: dict[str, Any], half: bool = True, extra: dict | None = None) -> None:
    from tokctl.runs import atomic_torch_save

    state = {k: (v.half() if half and v.is_floating_point() else v).clone()
             for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "tokenizer": config, "state_dict": state, "trained": trained}
    payload.update(extra or {})
    atomic_torch_save(payload, path)


class LoadedTokenizer:
    """A tokenizer ready for encode/decode, with the facts token files need."""

    def __init__(self, model: ImageTokenizer, config: dict, hash24: int, path: Path,
                 trained: dict):
        self.model, self.config, self.hash, self.path, self.trained = model, config, hash24, path, trained

    @property
    def name(self) -> str:
        return self.model.name


def load_tokenizer(path: Path | str | None = None) -> LoadedTokenizer:
    """A tokenizer file, a training run folder (its checkpoint.pt), a released TiTok folder
    (config.json + weights, see titok_release), or the embedded default."""
    path = embedded_path(path)
    from tokctl.imagetok.titok_release import is_release_folder, load_release

    if is_release_folder(path):  # a TiTok release of bytedance/1d-tokenizer
        model, config = load_release(path)
        return LoadedTokenizer(model, config, tokenizer_hash(config, model.state_dict()), path,
                               {"release": str(path)})
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        if path in EMBEDDED.values():
            raise UserError(f"the embedded tokenizer {path} is missing from this installation; "
                            f"reinstall tokctl or give tokenizer_path=FILE")
        raise UserError(f"{path}: no such tokenizer file (give a .pt from `tokctl tokenize-image "
                        f"train` or a run folder)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except UNREADABLE_FILE as exc:
        raise UserError(f"{path}: not a readable tokenizer file ({one_line_error(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a tokctl tokenizer file (format {FORMAT} expected)")
    config = payload["tokenizer"]
    model = build_tokenizer(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    model.eval()
    return LoadedTokenizer(model, config, tokenizer_hash(config, payload["state_dict"]), path,
                           payload.get("trained", {}))
