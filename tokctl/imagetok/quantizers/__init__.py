"""Quantisers: VQ (l2-normalised low-dimensional codes), residual VQ of depth D, and FSQ."""

from tokctl.imagetok.quantizers.base import Quantized, Quantizer
from tokctl.imagetok.quantizers.fsq import FSQ
from tokctl.imagetok.quantizers.rvq import ResidualVQ
from tokctl.imagetok.quantizers.vq import VectorQuantizer

__all__ = ["FSQ", "Quantized", "Quantizer", "ResidualVQ", "VectorQuantizer"]
