"""Loading ViT-family encoders and describing them to the patcher.

:class:`VitInfo` says where a model's transformer blocks are and how many prefix tokens ([CLS],
DeiT's distillation token, DINOv2's registers) precede the patches; :class:`BlockParts` gives
one block's own submodules (norms, projections, MLP, layer scales) so that a patched forward can
run them in its own order without copying a weight. Supported: transformers' ViT, DeiT, CLIP and
SigLIP vision towers, DINOv2 (with or without registers), tokctl's embedded default (a
transformers ViT), and timm VisionTransformers when timm is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tokctl.errors import UNREADABLE_FILE, UserError

# Mean/std per transformers model type, for configs that do not carry them.
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_OPENAI_CLIP = ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758])
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_NORMALISATION = {"vit": _HALF, "deit": _IMAGENET, "clip": _OPENAI_CLIP, "clip_vision_model": _OPENAI_CLIP,
                  "siglip": _HALF, "siglip_vision_model": _HALF, "dinov2": _IMAGENET,
                  "dinov2_with_registers": _IMAGENET}
SUPPORTED_HF = ("vit", "deit", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2",
                "dinov2_with_registers")


@dataclass
class BlockParts:
    """Views onto one transformer block's modules; nothing here owns a parameter."""

    norm1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    out_proj: nn.Module
    num_heads: int
    head_dim: int
    scale: float
    q_proj: nn.Module | None = None
    k_proj: nn.Module | None = None
    v_proj: nn.Module | None = None
    qkv: nn.Module | None = None  # fused projection (timm)
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    ls1: nn.Module | None = None
    ls2: nn.Module | None = None

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim)."""
        b, n, _ = h.shape
        if self.qkv is not None:
            q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            shape = (b, n, self.num_heads, self.head_dim)
            q = self.q_proj(h).view(shape).transpose(1, 2)
            k = self.k_proj(h).view(shape).transpose(1, 2)
            v = self.v_proj(h).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


@dataclass
class VitInfo:
    family: str  # "default", "vit", "deit", "clip", "siglip", "dinov2", "timm"
    blocks: list[nn.Module]
    parts: list[BlockParts]
    prefix_tokens: int  # tokens before the patches, never merged or pruned
    grid: tuple[int, int]  # patches per column and row
    patch_size: int
    image_size: int
    num_channels: int
    hidden_size: int
    mlp_hidden: int
    mean: list[float]
    std: list[float]
    num_labels: int  # 0: an encoder without a classifier (compared on its pooled features)
    id2label: dict[int, str] = field(default_factory=dict)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # pixels -> logits or features

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.prefix_tokens


# --------------------------------------------------------------------------------- transformers
def _hf_parts(block: nn.Module, model_type: str) -> BlockParts:
    if model_type in ("vit", "deit"):
        attn = block.attention
        return BlockParts(norm1=block.layernorm_before, norm2=block.layernorm_after, mlp=block.mlp,
                          q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, out_proj=attn.o_proj,
                          num_heads=attn.num_attention_heads, head_dim=attn.head_dim, scale=attn.scaling)
    if model_type in ("dinov2", "dinov2_with_registers"):
        attn = block.attention
        return BlockParts(norm1=block.norm1, norm2=block.norm2, mlp=block.mlp, ls1=block.layer_scale1,
                          ls2=block.layer_scale2, q_proj=attn.q_proj, k_proj=attn.k_proj,
                          v_proj=attn.v_proj, out_proj=attn.o_proj, num_heads=attn.num_attention_heads,
                          head_dim=attn.head_dim, scale=attn.scaling)
    attn = block.self_attn  # clip, siglip
    return BlockParts(norm1=block.layer_norm1, norm2=block.layer_norm2, mlp=block.mlp,
                      q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, out_proj=attn.out_proj,
                      num_heads=attn.num_heads, head_dim=attn.head_dim, scale=attn.scale)


def _find_layers(model: nn.Module, layer_class_suffixes: tuple[str, ...]) -> list[nn.Module]:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                type(m).__name__.endswith(layer_class_suffixes) for m in module):
            return list(module)
    return []


def _hf_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixels)
        logits = getattr(out, "logits", None)
        if logits is not None:
            return logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]
    return forward


def describe_hf(model: nn.Module, family: str | None = None) -> VitInfo:
    config = model.config
    model_type = getattr(config, "model_type", "")
    vision = getattr(config, "vision_config", None)
    if model_type in ("clip", "siglip") and vision is not None:
        raise UserError(f"{model_type} model: pass its vision tower (tokctl loads CLIPVisionModel / "
                        f"SiglipVisionModel from the same id or folder)")
    if model_type not in SUPPORTED_HF:
        raise UserError(f"{type(model).__name__} (model_type {model_type!r}) is not a ViT-family encoder; "
                        f"supported: {', '.join(sorted(set(t.split('_')[0] for t in SUPPORTED_HF)))} and timm ViTs")
    blocks = _find_layers(model, ("ViTLayer", "DeiTLayer", "EncoderLayer", "Dinov2Layer",
                                  "Dinov2WithRegistersLayer"))
    if not blocks:
        raise UserError(f"could not find the transformer blocks of {type(model).__name__}")
    base = model_type.replace("_vision_model", "")
    prefix = {"vit": 1, "deit": 2 if "Distill" in type(model).__name__ or _has_dist_token(model) else 1,
              "clip": 1, "siglip": 0, "dinov2": 1,
              "dinov2_with_registers": 1 + int(getattr(config, "num_register_tokens", 0))}[base]
    image_size, patch_size = int(config.image_size), int(config.patch_size)
    side = image_size // patch_size
    mean, std = _NORMALISATION.get(model_type, _HALF)
    mean = list(getattr(config, "image_mean", None) or mean)
    std = list(getattr(config, "image_std", None) or std)
    num_labels = int(getattr(config, "num_labels", 0)) if hasattr(model, "classifier") else 0
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()} if num_labels else {}
    return VitInfo(family=family or base.split("_")[0], blocks=blocks,
                   parts=[_hf_parts(b, base) for b in blocks], prefix_tokens=prefix,
                   grid=(side, side), patch_size=patch_size, image_size=image_size,
                   num_channels=int(getattr(config, "num_channels", 3)),
                   hidden_size=int(config.hidden_size), mlp_hidden=_mlp_hidden(blocks[0], config),
                   mean=mean, std=std, num_labels=num_labels, id2label=id2label,
                   forward=_hf_forward(model))


def _has_dist_token(model: nn.Module) -> bool:
    emb = getattr(getattr(model, "deit", model), "embeddings", None)
    return getattr(emb, "distillation_token", None) is not None


def _mlp_hidden(block: nn.Module, config) -> int:
    for name in ("fc1", "up_proj"):
        layer = getattr(getattr(block, "mlp", None), name, None)
        if layer is not None:
            return int(layer.out_features)
    return int(getattr(config, "intermediate_size", 4 * config.hidden_size))


# ------------------------------------------------------------------------------------------ timm
def describe_timm(model: nn.Module) -> VitInfo:
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(hasattr(b, "attn") and hasattr(getattr(b, "attn"), "qkv") for b in blocks):
        raise UserError(f"timm model {type(model).__name__} is not a plain VisionTransformer "
                        f"(blocks with a fused qkv attention)")
    parts = []
    for b in blocks:
        attn = b.attn
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        identity = (q_norm is None or isinstance(q_norm, nn.Identity))
        parts.append(BlockParts(norm1=b.norm1, norm2=b.norm2, mlp=b.mlp, qkv=attn.qkv,
                                out_proj=_timm_out(attn), num_heads=attn.num_heads,
                                head_dim=attn.head_dim, scale=float(attn.scale),
                                q_norm=None if identity else q_norm, k_norm=None if identity else k_norm,
                                ls1=getattr(b, "ls1", None), ls2=getattr(b, "ls2", None)))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(model.patch_embed.img_size[0])
    patch = int(model.patch_embed.patch_size[0])
    return VitInfo(family="timm", blocks=blocks, parts=parts,
                   prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)), grid=grid,
                   patch_size=patch, image_size=size,
                   num_channels=int(model.patch_embed.proj.in_channels),
                   hidden_size=int(model.embed_dim), mlp_hidden=int(blocks[0].mlp.fc1.out_features),
                   mean=list(cfg.get("mean", _IMAGENET[0])), std=list(cfg.get("std", _IMAGENET[1])),
                   num_labels=int(getattr(model, "num_classes", 0)), forward=model)


def _timm_out(attn: nn.Module) -> nn.Module:
    # Newer timm puts an optional norm before the output projection.
    norm = getattr(attn, "norm", None)
    if norm is None or isinstance(norm, nn.Identity):
        return attn.proj
    return nn.Sequential(norm, attn.proj)


# ------------------------------------------------------------------------------------- describe
def describe(model: nn.Module) -> VitInfo:
    """A VitInfo for any supported encoder, or one line saying why this model is not one."""
    if getattr(model, "config", None) is not None and hasattr(model.config, "model_type"):
        return describe_hf(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return describe_timm(model)
    raise UserError(f"{type(model).__name__} is not a ViT-family encoder (transformers ViT/DeiT/CLIP/"
                    f"SigLIP/DINOv2 or a timm VisionTransformer)")


# -------------------------------------------------------------------------------------- loading
def _hf_class_for(config):
    import transformers

    model_type = getattr(config, "model_type", "")
    if model_type == "clip" or model_type == "clip_vision_model":
        return transformers.CLIPVisionModel
    if model_type == "siglip" or model_type == "siglip_vision_model":
        return transformers.SiglipVisionModel
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForImageClassification") for a in archs) or (
            getattr(config, "id2label", None) and len(config.id2label) > 2):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def _dtype(name: str | None):
    if name in (None, "float32", "fp32"):
        return torch.float32
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"model.dtype={name} is not one of float32, float16, bfloat16")
    return table[name]


def load_hf(id_or_path: str, dtype: str | None = None) -> nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(id_or_path).expanduser()
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a transformers model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path) if local else id_or_path)
    except (OSError, ValueError, KeyError) as exc:  # not found, offline, not a config
        raise UserError(f"could not load the config of {id_or_path!r} (offline: pass a local folder "
                        f"with model.path=DIR): {str(exc).splitlines()[0][:200]}") from None
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED_HF:
        raise UserError(f"{id_or_path} is a {model_type!r} model, not a ViT-family encoder; "
                        f"supported: vit, deit, clip, siglip, dinov2")
    cls = _hf_class_for(config)
    try:
        model = cls.from_pretrained(str(path) if local else id_or_path, dtype=_dtype(dtype),
                                    attn_implementation="sdpa")
    except UNREADABLE_FILE as exc:  # missing or damaged weights, shapes that do not fit
        raise UserError(f"could not load {id_or_path!r}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval()


def build_hf_random(family: str, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                    image_size: int, patch_size: int, num_labels: int, intermediate_size: int | None = None,
                    seed: int = 0) -> nn.Module:
    """A real architecture with random weights: speed and token counts do not depend on weights."""
    import transformers

    common = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, image_size=image_size, patch_size=patch_size,
                  intermediate_size=intermediate_size or 4 * hidden_size, attn_implementation="sdpa")
    torch.manual_seed(seed)
    if family == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=num_labels, **common))
    elif family == "deit":
        model = transformers.DeiTForImageClassification(transformers.DeiTConfig(num_labels=num_labels, **common))
    elif family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    elif family == "siglip":  # no prefix token (attention pooling)
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    elif family in ("dinov2", "dinov2_registers"):
        common.pop("intermediate_size")
        mlp_ratio = (intermediate_size or 4 * hidden_size) // hidden_size
        if family == "dinov2":
            model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
                num_labels=num_labels, mlp_ratio=mlp_ratio, **common))
        else:  # [CLS] + 4 registers
            model = transformers.Dinov2WithRegistersForImageClassification(
                transformers.Dinov2WithRegistersConfig(num_labels=num_labels, mlp_ratio=mlp_ratio, **common))
    else:
        raise UserError(f"model.family={family} is not one of vit, deit, clip, siglip, dinov2, dinov2_registers")
    return model.eval()


def load_timm(name: str, checkpoint: str | None = None, pretrained: bool = False) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise UserError(f"model=timm needs timm (`pip install 'tokctl[timm]'`): {exc}") from None
    try:
        model = timm.create_model(name, pretrained=pretrained,
                                  checkpoint_path=checkpoint or "")
    except UNREADABLE_FILE as exc:  # an unknown model name, a missing or damaged checkpoint
        raise UserError(f"timm could not create {name!r}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval()


def load(model_cfg: Any) -> tuple[nn.Module, VitInfo]:
    """The model named by the ``model`` config group, in eval mode, and its description."""
    from tokctl.vit import default_model

    kind = model_cfg.get("kind", "default")
    if kind == "default":
        model = default_model.load(model_cfg.get("path"))
    elif kind == "hf":
        source = model_cfg.get("path") or model_cfg.get("id")
        if not source:
            raise UserError("model=hf needs model.id=HUB_ID or model.path=FOLDER")
        model = load_hf(str(source), model_cfg.get("dtype"))
    elif kind == "hf_random":
        model = build_hf_random(model_cfg.family, model_cfg.hidden_size, model_cfg.num_hidden_layers,
                                model_cfg.num_attention_heads, model_cfg.image_size, model_cfg.patch_size,
                                model_cfg.num_labels, model_cfg.get("intermediate_size"),
                                int(model_cfg.get("seed", 0)))
    elif kind == "timm":
        model = load_timm(model_cfg.name, model_cfg.get("checkpoint"), bool(model_cfg.get("pretrained", False)))
    else:
        raise UserError(f"model.kind={kind} is not one of default, hf, hf_random, timm")
    info = describe(model)
    if model_cfg.get("image_size") and info.family == "dinov2":
        # DINOv2 interpolates its position embeddings: any multiple of the patch size works.
        info.image_size = int(model_cfg.image_size)
        side = info.image_size // info.patch_size
        info.grid = (side, side)
    if kind == "default":
        info.family = "default"
    return model, info
