"""TiTok as bytedance/1d-tokenizer releases it: a folder with ``config.json`` (the OmegaConf
config, ``model.vq_model`` and ``dataset.preprocessing.crop_size``) and the weights
(``model.safetensors`` or ``pytorch_model.bin``) under the official parameter names.

The published checkpoints (TiTok-L-32, B-64, S-128) are "legacy two-stage" models: the ViT
decoder predicts, per 16x16 patch, logits over the 1024 codes of a MaskGIT-VQGAN, whose
convolutional decoder (``pixel_decoder``) paints the pixels. ``is_legacy: false`` models predict
RGB patches directly. Both are built here, with module names that match the released keys, so a
release loads with ``strict=True``. Images are (B, 3, S, S) in [0, 1], as in the release.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokctl.errors import UserError
from tokctl.imagetok.models.base import ImageTokenizer
from tokctl.imagetok.quantizers import VectorQuantizer

# width, layers, heads of the release's named ViT sizes
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
# the MaskGIT-VQGAN pixel decoder the legacy releases embed
PIXEL_DECODER = {"hidden_channels": 128, "channel_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2,
                 "z_channels": 256, "codes": 1024}


class ReleaseBlock(nn.Module):
    """Pre-norm block with torch's MultiheadAttention (keys ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ReleaseViT(nn.Module):
    """Parameters shared by the release's encoder and decoder."""

    def __init__(self, width: int, layers: int, heads: int, grid: int, num_latents: int):
        super().__init__()
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latents, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(ReleaseBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        return x


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.changes_width = cin != cout
        if self.changes_width:
            self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        # As released: when the width changes, the shortcut is taken from the block's output,
        # not its input. Reproduced so the released weights give the released images.
        return h + (self.nin_shortcut(h) if self.changes_width else x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n_res: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_res))
        self.upsample = upsample
        if upsample:
            self.upsample_conv = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.block:
            x = b(x)
        if self.upsample:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class PixelDecoder(nn.Module):
    """MaskGIT-VQGAN's decoder (no attention layers): codes' embeddings -> pixels."""

    def __init__(self, hidden: int, mult: tuple[int, ...], n_res: int, z_channels: int):
        super().__init__()
        n = len(mult)
        top = hidden * mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = nn.ModuleList(ResnetBlock(top, top) for _ in range(n_res))
        self.up = nn.ModuleList(
            UpBlock(hidden * (mult[-1] if i == n - 1 else mult[i + 1]), hidden * mult[i], n_res,
                    upsample=i != 0) for i in range(n))
        self.norm_out = nn.GroupNorm(32, hidden * mult[0], eps=1e-6)
        self.conv_out = nn.Conv2d(hidden * mult[0], 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for b in self.mid:
            x = b(x)
        for b in reversed(self.up):
            x = b(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class PixelCodebook(nn.Module):
    def __init__(self, codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codes, dim)


class ReleaseEncoder(ReleaseViT):
    def __init__(self, width, layers, heads, grid, num_latents, patch, token_size, legacy):
        super().__init__(width, layers, heads, grid, num_latents)
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.conv_out = nn.Conv2d(width, token_size, 1)
        self.legacy, self.num_latents, self.width = legacy, num_latents, width

    def forward(self, pixels: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, 1, -1), x], 1) + self.positional_embedding
        lat = latent_tokens.expand(b, -1, -1) + self.latent_token_positional_embedding
        x = self.run(torch.cat([x, lat], 1))
        lat = self.ln_post(x[:, -self.num_latents:])
        if self.legacy:  # the release's reshape (not a transpose) of (B, L, W) into (B, W, L, 1)
            lat = lat.reshape(b, self.width, self.num_latents, 1)
        else:
            lat = lat.permute(0, 2, 1).unsqueeze(-1)
        return self.conv_out(lat).reshape(b, -1, self.num_latents).transpose(1, 2)  # (B, L, C)


class ReleaseDecoder(ReleaseViT):
    def __init__(self, width, layers, heads, grid, num_latents, patch, token_size, legacy,
                 pixel_codes: int):
        super().__init__(width, layers, heads, grid, num_latents)
        self.decoder_embed = nn.Linear(token_size, width)
        self.mask_token = nn.Parameter(width ** -0.5 * torch.randn(1, 1, width))
        self.grid, self.patch, self.legacy = grid, patch, legacy
        if legacy:
            self.ffn = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.Tanh(),
                                     nn.Conv2d(2 * width, pixel_codes, 1))
            self.conv_out = nn.Identity()
        else:
            self.ffn = nn.Sequential(nn.Conv2d(width, patch * patch * 3, 1))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = z.shape
        x = self.decoder_embed(z) + self.latent_token_positional_embedding[:n]
        grid = self.mask_token.expand(b, self.grid * self.grid, -1)
        grid = torch.cat([self.class_embedding.expand(b, 1, -1), grid], 1) + self.positional_embedding
        x = self.run(torch.cat([grid, x], 1))
        x = self.ln_post(x[:, 1:1 + self.grid * self.grid])
        x = self.ffn(x.transpose(1, 2).reshape(b, -1, self.grid, self.grid))
        if not self.legacy:  # (p1 p2 c) channels -> pixels
            p = self.patch
            x = x.reshape(b, p, p, 3, self.grid, self.grid).permute(0, 3, 4, 1, 5, 2)
            x = x.reshape(b, 3, self.grid * p, self.grid * p)
        return self.conv_out(x)


class ReleaseTiTok(ImageTokenizer):
    name = "titok-release"

    def __init__(self, config: dict):
        vq = config["model"]["vq_model"]
        image_size = int(config["dataset"]["preprocessing"]["crop_size"])
        num_latents = int(vq["num_latent_tokens"])
        token_size = int(vq["token_size"])
        quantizer = VectorQuantizer(int(vq["codebook_size"]), token_size,
                                    normalize=bool(vq.get("use_l2_norm", True)), ema=False,
                                    kmeans_init=False)
        super().__init__(image_size, quantizer, num_latents)
        if vq.get("quantize_mode", "vq") != "vq":
            raise UserError("only quantize_mode=vq TiTok releases make discrete tokens")
        legacy = bool(vq.get("is_legacy", True))
        self.finetune_decoder = bool(vq.get("finetune_decoder", True))
        enc, dec = (VIT_SIZES[vq[k]] for k in ("vit_enc_model_size", "vit_dec_model_size"))
        pe, pd = int(vq["vit_enc_patch_size"]), int(vq["vit_dec_patch_size"])
        self.latent_tokens = nn.Parameter(enc[0] ** -0.5 * torch.randn(num_latents, enc[0]))
        self.encoder = ReleaseEncoder(*enc, image_size // pe, num_latents, pe, token_size, legacy)
        self.decoder = ReleaseDecoder(*dec, image_size // pd, num_latents, pd, token_size, legacy,
                                      PIXEL_DECODER["codes"])
        if self.finetune_decoder:
            self.pixel_quantize = PixelCodebook(PIXEL_DECODER["codes"], PIXEL_DECODER["z_channels"])
            self.pixel_decoder = PixelDecoder(PIXEL_DECODER["hidden_channels"],
                                              tuple(PIXEL_DECODER["channel_mult"]),
                                              PIXEL_DECODER["num_res_blocks"],
                                              PIXEL_DECODER["z_channels"])

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, self.latent_tokens)

    def decode_latents(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.decoder(latents[:, : int(keep.max())])
        if self.finetune_decoder:
            codes = torch.einsum("nchw,cd->ndhw", x.softmax(1), self.pixel_quantize.embedding.weight)
            x = self.pixel_decoder(codes)
        return x


def is_release_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def load_release(folder: Path | str) -> tuple[ReleaseTiTok, dict]:
    """A released TiTok folder -> (model in eval mode, its config). Released key names map
    onto this module's one to one, except the tokenizer's codebook (``quantize.embedding.weight``
    there, ``quantizer.codebook`` here)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        _ = config["model"]["vq_model"], config["dataset"]["preprocessing"]["crop_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder}/config.json: not a 1d-tokenizer TiTok config ({exc})") from None
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {("quantizer.codebook" if k == "quantize.embedding.weight" else k): v
             for k, v in state.items()}
    try:
        model = ReleaseTiTok(config)
    except KeyError as exc:
        raise UserError(f"{folder}/config.json: unknown TiTok size {exc}") from None
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{folder}: weights do not match the config ({wrong[0]}: "
                        f"{tuple(state[wrong[0]].shape)} in the file, "
                        f"{tuple(own[wrong[0]].shape)} from config.json)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("quantizer.") or k == "quantizer.codebook"]
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not match the config (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config
