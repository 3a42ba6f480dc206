"""The embedded default ViT: a transformers ``ViTForImageClassification`` trained by tokctl on
Fashion-MNIST, with 2x2-pixel patches so that a 28x28 image is 196 patches + [CLS] = 197 tokens,
the token count of ViT-B/16 at 224x224. It is narrow and shallow (width and depth are what we
could afford to train on two CPU cores), not short: token compression acts on a sequence as long
as ViT-B's.

The checkpoint (fp16 safetensors + config.json) lives in ``tokctl/vit/weights/fashion-vit``, next
to ``train.yaml`` and ``COMMAND``, the exact config and command that produced it.
"""

from __future__ import annotations

from pathlib import Path

from tokctl.errors import UserError

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion-vit"


def vit_config(image_size: int = 28, patch_size: int = 2, hidden_size: int = 96,
               num_hidden_layers: int = 8, num_attention_heads: int = 3, mlp_ratio: int = 4,
               num_labels: int = 10, num_channels: int = 1):
    from transformers import ViTConfig

    from tokctl.vit import fashion_mnist

    return ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=num_channels,
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=mlp_ratio * hidden_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True,
        num_labels=num_labels,
        id2label=dict(enumerate(fashion_mnist.CLASSES)) if num_labels == 10 else None,
        # Read back by tokctl's preprocessing: how pixels are standardised for this model.
        image_mean=[fashion_mnist.MEAN] * num_channels, image_std=[fashion_mnist.STD] * num_channels,
        attn_implementation="sdpa",
    )


def build(**arch):
    """A randomly initialised default-architecture model (training starts here)."""
    from transformers import ViTForImageClassification

    return ViTForImageClassification(vit_config(**arch))


def load(path: str | Path | None = None, dtype=None):
    """The shipped checkpoint (or another folder written by ``tokctl compress-vit train``)."""
    import torch
    from transformers import ViTForImageClassification

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per problem on stderr, not a loading bar
    folder = Path(path).expanduser() if path else WEIGHTS
    if not (folder / "config.json").is_file():
        raise UserError(f"no trained default ViT in {folder}; train one with "
                        f"`tokctl compress-vit train` or reinstall tokctl")
    model = ViTForImageClassification.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation="sdpa")
    return model.eval()
