"""`tokctl tokenize-image`: discrete image tokenizers (1D and 2D), their token files, training
and rate-distortion evaluation against JPEG and WebP."""
