"""Kangaroo's adapter (Liu et al., 2024): what turns the target's first L layers into a draft.

The draft is the target's own first ``exit_layer`` decoder layers (shared weights), then the
adapter, then the target's LM head (shared too). The adapter is the paper's design: one attention
sublayer (input RMSNorm, q/k/v/o projections, residual; no MLP) and a final RMSNorm that takes the
place of the model's own. It is trained by self-distillation (``tokctl decode train-adapter``) to
make the exit's next-token distribution agree with the full model's.

An adapter file is a safetensors file (fp16 weights) whose metadata records the exit layer, the
shapes, and the fingerprint of the model it was trained on; a different model is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokctl.errors import UserError

SHIPPED_DIR = Path(__file__).parent / "adapters"
# The adapters shipped for the embedded SmolLM2-135M (the only model `auto` serves; another is
# refused by its fingerprint), by exit layer; Kangaroo's default is layer 4.
SHIPPED_MODEL = "smollm2-135m"
DEFAULT_EXIT = 4


def shipped_adapter(exit_layer: int | None = None) -> Path:
    layer = DEFAULT_EXIT if exit_layer is None else int(exit_layer)
    suffix = "" if layer == DEFAULT_EXIT else f"-L{layer}"
    return SHIPPED_DIR / f"{SHIPPED_MODEL}-kangaroo{suffix}.safetensors"

class _Norm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class KangarooAdapter(nn.Module):
    """One attention sublayer and a final norm, shaped like the target's layers."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 exit_layer: int):
        super().__init__()
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.eps, self.exit_layer = float(eps), int(exit_layer)
        self.input_layernorm = _Norm(hidden)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.norm = _Norm(hidden)

    @classmethod
    def for_model(cls, model, exit_layer: int) -> "KangarooAdapter":
        """A fresh adapter for ``model``, started from the attention of layer ``exit_layer`` and
        the model's final norm: the layer the exit skips next is a better start than noise, and
        with a zero-step adapter the draft is close to ``self:exit_layer``."""
        cfg = model.config
        n_layers = cfg.num_hidden_layers
        if not 1 <= exit_layer < n_layers:
            raise UserError(f"exit_layer={exit_layer}: choose it from 1 to {n_layers - 1} "
                            f"(the model has {n_layers} layers)")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        a = cls(cfg.hidden_size, heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps,
                exit_layer)
        layer = model.model.layers[exit_layer]
        with torch.no_grad():
            a.input_layernorm.weight.copy_(layer.input_layernorm.weight.float())
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(a, name).weight.copy_(getattr(layer.self_attn, name).weight.float())
            a.norm.weight.copy_(model.model.norm.weight.float())
        return a

    def _rms(self, x, weight):
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def train_forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Training: ``h`` [B, T, d] the exit's hidden states of whole sequences (causal, right
        padded), ``cos``/``sin`` [T, D]. Returns the normalised features the head reads. The same
        arithmetic as the lean forward's adapter step, batched."""
        b, t, _ = h.shape
        x = self._rms(h, self.input_layernorm.weight)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return self._rms(h, self.norm.weight)

    def meta(self) -> dict:
        return {"exit_layer": self.exit_layer, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "eps": self.eps}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def model_fingerprint(model) -> str:
    """A short hash of the model's shapes and of its first embedding rows, rounded to bf16 (so
    that the same weights loaded in fp32 or bf16 give the same fingerprint)."""
    cfg = model.config
    shape = [cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
             cfg.num_key_value_heads, cfg.vocab_size]
    rows = model.get_input_embeddings().weight[:64].detach().to("cpu", torch.bfloat16)
    h = hashlib.sha256(json.dumps(shape).encode())
    h.update(rows.contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(adapter: KangarooAdapter, path, fingerprint: str, extra: dict | None = None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float16).contiguous()
               for k, v in adapter.state_dict().items()}
    meta = {"kind": "kangaroo-adapter", "config": json.dumps(adapter.meta()),
            "model_fingerprint": fingerprint, "info": json.dumps(extra or {})}
    save_file(tensors, str(path), metadata=meta)


def load_adapter(path, model, dtype=None) -> tuple[KangarooAdapter, dict]:
    """The adapter in ``path`` for ``model``; refused in one line if it was trained on another
    model or the file is not an adapter."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"method.adapter={path}: no such file (train one with "
                        f"`tokctl decode train-adapter`, then pass RUN/adapter.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line to the user
        raise UserError(f"method.adapter={path} is not a safetensors file: {exc}") from None
    if meta.get("kind") != "kangaroo-adapter":
        raise UserError(f"method.adapter={path} is not a Kangaroo adapter (made by "
                        f"`tokctl decode train-adapter`)")
    mine = model_fingerprint(model)
    if meta.get("model_fingerprint") != mine:
        raise UserError(f"method.adapter={path} was trained on another model (fingerprint "
                        f"{meta.get('model_fingerprint')}, this model's is {mine}); train one "
                        f"for it with `tokctl decode train-adapter`")
    cfg = json.loads(meta["config"])
    adapter = KangarooAdapter(**cfg)
    adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
    param = next(model.parameters())
    adapter = adapter.to(param.device, dtype or param.dtype).eval().requires_grad_(False)
    return adapter, {"exit_layer": adapter.exit_layer, **json.loads(meta.get("info") or "{}")}


def resolve_adapter(value, exit_layer: int | None = None) -> Path:
    """``method.adapter``: ``auto`` (the adapter shipped for the embedded SmolLM2-135M at
    ``exit_layer``, default 4; another model is refused by its fingerprint), a run folder of
    `train-adapter`, or a file."""
    if value in (None, "", "auto"):
        return shipped_adapter(exit_layer)
    path = Path(str(value)).expanduser()
    if path.is_dir():
        path = path / "adapter.safetensors"
    return path
