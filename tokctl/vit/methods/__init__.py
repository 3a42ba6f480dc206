"""One module per token-compression method, each a :class:`tokctl.vit.patch.TokenMethod`
built from ``conf/compress_vit/method/<name>.yaml`` by its ``_target_``."""
