"""Each method on tiny random ViTs: token counts as planned, settings checked against the model."""

import json

import pytest
import torch

from tokctl.errors import UserError
from tokctl.vit.methods.cluster import ClusterTokens, local_kmeans
from tokctl.vit.methods.diffrate import DiffRate
from tokctl.vit.methods.evit import EViT, default_locations
from tokctl.vit.methods.tome import ToMe, parse_r
from tokctl.vit.methods.tsm import SlimTokens, TokenSlimming
from tokctl.vit.patch import apply_patch

from .tiny_models import pixels, tiny


def run(method, family="vit", layers=4, trace=False, **kw):
    model, info = tiny(family, layers=layers, **kw)
    patch = apply_patch(model, method, info, trace_source=trace)
    with torch.no_grad():
        out = info.forward(pixels())
    return patch, info, out


# ----------------------------------------------------------------------------------------- ToMe
def test_parse_r_forms():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(4, [5, 1]) == [5, 1, 0, 0]
    assert parse_r(3, 4, inflect=-1.0) == [8, 4, 0]  # decreasing schedule keeps the total
    with pytest.raises(UserError):
        parse_r(2, [1, 2, 3])


def test_tome_r_too_large_is_lowered_per_layer():
    model, info = tiny(layers=4)  # 64 patches + [CLS]: at most (65 - 1) // 2 = 32 merge in layer 0
    method = ToMe(r=40)
    patch = apply_patch(model, method, info)
    with torch.no_grad():
        info.forward(pixels())
    assert method.r_per_layer == [32, 16, 8, 4]
    assert patch.last_state.tokens_mlp == [33, 17, 9, 5]


def test_tome_source_tracks_every_patch_once():
    patch, info, _ = run(ToMe(r=8), trace=True)
    src = patch.last_state.source
    assert src.shape == (2, info.num_tokens - 8 * info.depth, info.num_tokens)
    # Every input token is held by exactly one output token; sizes agree with the source.
    assert torch.equal(src.sum(1), torch.ones_like(src.sum(1)))
    torch.testing.assert_close(patch.last_state.size[..., 0], src.sum(-1))


# ----------------------------------------------------------------------------------------- EViT
def test_evit_token_counts_match_the_plan():
    method = EViT(keep_rate=0.5)
    patch, info, _ = run(method, layers=8)
    assert default_locations(12) == [3, 6, 9]
    planned = method.planned_tokens(info)
    assert [a for a, _ in planned] == patch.last_state.tokens_attn
    assert [m for _, m in planned] == patch.last_state.tokens_mlp
    assert patch.last_state.tokens_mlp[2] == 1 + 32 + 1  # [CLS] + half of 64 + the fused token


def test_evit_keep_rate_one_changes_nothing():
    model, info = tiny()
    x = pixels()
    with torch.no_grad():
        ref = info.forward(x)
        apply_patch(model, EViT(keep_rate=1.0), info)
        torch.testing.assert_close(info.forward(x), ref, rtol=1e-5, atol=1e-5)


def test_evit_settings_checked():
    with pytest.raises(UserError):
        EViT(keep_rate=0.0)
    model, info = tiny(layers=3)
    with pytest.raises(UserError, match="outside"):
        apply_patch(model, EViT(locations=[5]), info)


# ------------------------------------------------------------------------------------- DiffRate
def test_diffrate_search_reaches_toward_the_target_and_rates_reload(tmp_path):
    model, info = tiny(layers=4)
    method = DiffRate(target_flops=0.5, granularity=4, search={"steps": 40, "lr": 0.05})
    patch = apply_patch(model, method, info)
    assert method.needs_search
    batches = ((pixels(seed=i), None) for i in range(1000))
    result = method.search(patch, batches)
    first, last = result["history"][0]["flops_ratio"], result["history"][-1]["flops_ratio"]
    assert abs(last - 0.5) < abs(first - 0.5)
    assert result["prune_kept"][0] == info.num_tokens  # the first layer is never compressed
    x = pixels(seed=99)
    with torch.no_grad():
        out = info.forward(x)
        tokens = list(patch.last_state.tokens_attn)
    assert tokens == [a for a, _ in method.planned_tokens(info)]
    patch.remove()
    (tmp_path / "diffrate_rates.json").write_text(json.dumps(method.rates()))
    reused = DiffRate(rates=str(tmp_path))
    apply_patch(model, reused, info)
    with torch.no_grad():
        torch.testing.assert_close(info.forward(x), out)
    assert all(p.requires_grad for p in model.parameters())  # the backbone was only frozen for the search


def test_diffrate_bad_rates_are_one_line_errors(tmp_path):
    model, info = tiny(layers=2)
    with pytest.raises(UserError, match="layers"):
        apply_patch(model, DiffRate(rates={"prune_kept": [65], "merge_kept": [65]}), info)
    with pytest.raises(UserError, match="no such file"):
        apply_patch(model, DiffRate(rates=str(tmp_path / "missing.json")), info)


# -------------------------------------------------------------------------------------- cluster
def test_cluster_tokens_and_full_resolution_output():
    method = ClusterTokens(clusters=(4, 4), cluster_after=0, reconstruct_after=2)
    patch, info, _ = run(method, layers=4, trace=True)
    assert patch.last_state.tokens_attn == [65, 17, 17, 65]
    assert method.planned_tokens(info) == [(65, 65), (17, 17), (17, 17), (65, 65)]


def test_cluster_at_full_grid_with_sharp_temperatures_is_lossless():
    """One cluster per patch and near-hard assignments: clustering and reconstruction are identities."""
    model, info = tiny(layers=3)
    x = pixels()
    with torch.no_grad():
        ref = info.forward(x)
        apply_patch(model, ClusterTokens(clusters=(8, 8), cluster_after=0, reconstruct_after=1,
                                         tau=1e-4, k=1, tau_reconstruct=1e-4), info)
        torch.testing.assert_close(info.forward(x), ref, rtol=1e-4, atol=1e-4)


def test_local_kmeans_centres_are_means_of_their_patches():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(1, 16, 3, generator=g)
    centres, hard = local_kmeans(patches, (4, 4), (2, 2), iters=3, window=3, tau=1e-4)
    for c in range(4):
        members = patches[0, hard[0] == c]
        if len(members):
            torch.testing.assert_close(centres[0, c], members.mean(0), rtol=1e-3, atol=1e-3)


def test_cluster_settings_checked():
    model, info = tiny(layers=3)
    with pytest.raises(UserError, match="finer"):
        apply_patch(model, ClusterTokens(clusters=(9, 9)), info)
    with pytest.raises(UserError):
        ClusterTokens(window=4)


# ------------------------------------------------------------------------------------------ TSM
def test_token_slimming_outputs_convex_combinations():
    tsm = TokenSlimming(dim=8, out_tokens=5)
    x = torch.randn(2, 12, 8)
    w = tsm.weights(x)
    assert w.shape == (2, 5, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    assert tsm(x).shape == (2, 5, 8)


def test_tsm_checkpoint_round_trip(tmp_path):
    from tokctl.runs import atomic_torch_save

    model, info = tiny(layers=4)
    trained = SlimTokens(None, slim_after=[0, 2], keep_ratio=0.5)
    trained.build(info)
    layout = {"slim_after": [0, 2], "keep_ratio": 0.5, "hidden_ratio": 0.5,
              "num_patches": info.num_patches, "hidden_size": info.hidden_size}
    atomic_torch_save({"layout": layout, "tsm": trained.tsm.state_dict(), "backbone": None}, tmp_path / "tsm.pt")
    method = SlimTokens(str(tmp_path))
    assert method.prepare_model(model) is model  # no fine-tuned backbone: patch the model itself
    patch = apply_patch(model, method, info)
    with torch.no_grad():
        info.forward(pixels())
    assert patch.last_state.tokens_attn == [65, 33, 33, 17]
    with pytest.raises(UserError, match="no such file"):
        SlimTokens(str(tmp_path / "nope.pt"))


def test_cluster_result_of_an_image_does_not_depend_on_its_batch():
    model, info = tiny(layers=3)
    apply_patch(model, ClusterTokens(clusters=(4, 4), cluster_after=0), info)
    x = pixels(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(info.forward(x)[:1], info.forward(x[:1]), rtol=1e-4, atol=1e-5)
