"""tokctl: experiments on tokens (speculative and sparse decoding, ViT token compression,
discrete image tokenizers)."""

__version__ = "0.1.0"
