"""Image tokenizers: one module each (titok, onedpiece, flexnested, vq2d)."""

from tokctl.imagetok.models.base import ImageTokenizer
from tokctl.imagetok.models.flexnested import FlexNested
from tokctl.imagetok.models.onedpiece import OneDPiece
from tokctl.imagetok.models.titok import TiTok
from tokctl.imagetok.models.vq2d import VQ2D

__all__ = ["FlexNested", "ImageTokenizer", "OneDPiece", "TiTok", "VQ2D"]
