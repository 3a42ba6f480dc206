"""Patching: exact when nothing is compressed, no weight copies, clean undo, bad models refused."""

import pytest
import torch

from tokctl.errors import UserError
from tokctl.vit.methods.none import NoCompression
from tokctl.vit.methods.tome import ToMe
from tokctl.vit.model import describe
from tokctl.vit.patch import apply_patch, remove_patch

from .tiny_models import pixels, tiny

FAMILIES = ["vit", "deit", "clip", "dinov2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_forward_reproduces_the_model(family):
    model, info = tiny(family)
    x = pixels()
    with torch.no_grad():
        ref = info.forward(x)
        patch = apply_patch(model, NoCompression(), info)
        torch.testing.assert_close(info.forward(x), ref, rtol=1e-5, atol=1e-5)
        patch.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_tome_reduces_tokens_and_undoes_cleanly(family):
    model, info = tiny(family)
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    x = pixels()
    with torch.no_grad():
        ref = info.forward(x)
        patch = apply_patch(model, ToMe(r=6), info)
        out = info.forward(x)
        assert out.shape == ref.shape
        assert patch.last_state.tokens_attn == [info.num_tokens - 6 * i for i in range(info.depth)]
        with patch.disabled():
            torch.testing.assert_close(info.forward(x), ref)
        assert patch.last_state.tokens_attn[-1] < info.num_tokens  # disabled runs leave no state
        remove_patch(model)
        torch.testing.assert_close(info.forward(x), ref)
    assert all("forward" not in b.__dict__ for b in info.blocks)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before
    assert not hasattr(model, "_tokctl_patch")


def test_prefix_tokens_of_each_family():
    assert describe(tiny("vit")[0]).prefix_tokens == 1
    assert describe(tiny("deit")[0]).prefix_tokens == 2  # [CLS] + distillation token
    assert describe(tiny("dinov2")[0]).prefix_tokens == 1


def test_patching_twice_is_refused():
    model, info = tiny()
    apply_patch(model, ToMe(r=2), info)
    with pytest.raises(UserError, match="already patched"):
        apply_patch(model, ToMe(r=2), info)


def test_non_vit_models_are_refused():
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UserError, match="not a ViT-family encoder"):
        describe(bert)
    with pytest.raises(UserError, match="not a ViT-family encoder"):
        describe(torch.nn.Linear(3, 3))


def test_proportional_attention_makes_merging_identical_tokens_lossless():
    """Two identical tokens merged into one of size 2, with log(2) added to its attention logits,
    are exactly the pair they replace; so on an image whose patches are all the same (and no
    position embedding to tell them apart), ToMe changes nothing."""
    model, info = tiny("vit", layers=4)
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.zero_()
        x = torch.full((1, 3, 32, 32), 0.3)
        ref = info.forward(x)
        apply_patch(model, ToMe(r=12), info)
        out = info.forward(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
