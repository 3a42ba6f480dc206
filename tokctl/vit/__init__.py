"""Token compression in Vision Transformers: merging (ToMe), pruning (EViT), learned rates
(DiffRate), clustering with reconstruction (Expediting) and learned slimming (SiT's TSM).

Layout: ``model.py`` loads ViT-family encoders (the embedded default, transformers, timm),
``patch.py`` swaps their blocks' forward for one that carries token sizes and calls a method,
``methods/`` holds one module per method, ``job.py`` measures a method against the uncompressed
model, ``train.py`` trains the embedded default.
"""
