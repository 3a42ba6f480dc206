"""The timm adapter (fused qkv, layer scales) on a stand-in with timm's module layout: timm itself
is optional and not installed in CI, so this checks the adapter's reading of that layout."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from tokctl.vit.methods.none import NoCompression
from tokctl.vit.methods.tome import ToMe
from tokctl.vit.model import describe
from tokctl.vit.patch import apply_patch


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(self.norm(out))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim), LayerScale(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim, image=16, patch=4):
        super().__init__()
        self.img_size, self.patch_size, self.grid_size = (image, image), (patch, patch), (image // patch,) * 2
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, dim=24, depth=3, heads=2, classes=4):
        super().__init__()
        self.embed_dim, self.num_classes, self.num_prefix_tokens = dim, classes, 1
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def test_timm_layout_patches_exactly_and_merges():
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    info = describe(model)
    assert info.family == "timm" and info.num_tokens == 17 and info.parts[0].qkv is model.blocks[0].attn.qkv
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        patch = apply_patch(model, NoCompression(), info)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        patch.remove()
        patch = apply_patch(model, ToMe(r=3), info)
        model(x)
    assert patch.last_state.tokens_mlp == [14, 11, 8]


def test_timm_missing_is_one_line():
    from tokctl.errors import UserError
    from tokctl.vit.model import load_timm

    try:
        import timm  # noqa: F401
        pytest.skip("timm is installed here")
    except Exception:  # noqa: BLE001
        pass
    with pytest.raises(UserError, match="timm"):
        load_timm("vit_tiny_patch16_224")
