"""No compression: the patched forward alone, to check it reproduces the model and to measure
the patch's own overhead."""

from tokctl.vit.patch import TokenMethod


class NoCompression(TokenMethod):
    name = "none"

    def __init__(self, prop_attn: bool = True):
        super().__init__()
        self.prop_attn = prop_attn

    def planned_tokens(self, info):
        return [(info.num_tokens, info.num_tokens)] * info.depth
