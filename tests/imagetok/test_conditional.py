"""Cluster-conditional priors: k-means over colour layouts, `prior train prior.conditions=N`,
and `sample condition=c` (its cluster_match and its bad inputs in one line each)."""

import json

import torch
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.config import compose
from tokctl.imagetok import clusters
from tokctl.imagetok import prior as prior_mod
from tokctl.jobs import JOBS, execute


def test_kmeans_finds_separated_blobs_and_keeps_every_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 9.0]])
    x = torch.cat([c + 0.3 * torch.randn(40, 2, generator=gen) for c in centres])
    found = clusters.kmeans(x, 3, torch.Generator().manual_seed(1))
    # each true centre has one found centroid close to it, and the labels are the blobs
    assert torch.cdist(centres, found).min(1).values.max() < 0.3
    labels = clusters.nearest(x, found)
    assert all(len(set(labels[i * 40:(i + 1) * 40].tolist())) == 1 for i in range(3))
    same = torch.zeros(10, 2)  # ten identical points, three clusters: none may stay empty
    assert torch.isfinite(clusters.kmeans(same, 3, torch.Generator().manual_seed(0))).all()


def test_colour_layout_is_the_mean_colour_of_each_cell():
    im = torch.zeros(1, 3, 8, 8)
    im[0, 0, :4, :4] = 1.0  # red top-left quarter
    f = clusters.colour_layout(im).view(3, 4, 4)
    assert f[0, :2, :2].eq(1).all() and f[0, 2:].eq(0).all() and f[1:].eq(0).all()


def _train(tiny_tokenizer_file, photo_folder, path, *extra):
    job = JOBS["tokenize-image prior train"]
    over = [f"tokenizer_path={tiny_tokenizer_file[0]}", f"data.folders=[{photo_folder}]",
            "data.crops=32", "data.val_crops=8", "prior.width=16", "prior.layers=1",
            "prior.heads=2", "train.batch_size=8", "train.steps=6", "train.val_every=3",
            "train.log_every=3", "train.lr_warmup_steps=1", "threads=1", *extra]
    return execute(job, compose(job.conf, job.config_name, over), path)


def test_conditional_prior_trains_and_samples_each_cluster(tiny_tokenizer_file, tiny_prior,
                                                           photo_folder, tmp_path):
    status, run = _train(tiny_tokenizer_file, photo_folder, tmp_path / "cond", "prior.conditions=3")
    assert status == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val_bits_per_token_conditional" in metrics
    prior = prior_mod.load_prior(run / "prior.pt")
    assert prior.model.conditions == 3 and prior.model.centroids.abs().sum() > 0
    assert abs(float(prior.model.cluster_share.sum()) - 1) < 1e-3
    # the start ids select different distributions of the first token
    first = [torch.softmax(prior.model(torch.zeros(1, 2, dtype=torch.long),
                                       torch.tensor([prior.model.start_id(c)]))[0, 0], -1)
             for c in (None, 0, 1)]
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[1], first[2])

    def sample(*extra):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        res = CliRunner().invoke(app, ["tokenize-image", "sample",
                                       f"tokenizer_path={tiny_tokenizer_file[0]}",
                                       f"prior_path={run}", "threads=1", "images=4",
                                       f"hydra.run.dir={out}", *extra])
        return res, out

    for extra in (["batch=4"], ["batch=1", "method=lantern", "method.k=3", "method.delta=0.1",
                                "guidance=3"]):
        res, out = sample("condition=2", *extra)
        assert res.exit_code == 0, res.output
        m = json.loads((out / "metrics.json").read_text())
        assert m["condition"] == 2 and 0 <= m["cluster_match"] <= 1
        assert m["guidance"] == (3 if "guidance=3" in extra else 1)
        assert abs(m["cluster_share"] - float(prior.model.cluster_share[2])) < 1e-6
    res, _ = sample("guidance=2")
    assert res.exit_code != 0 and "give condition=" in res.output
    res, _ = sample("condition=3")
    assert res.exit_code != 0 and "clusters 0..2" in res.output and "Traceback" not in res.output
    res, _ = sample("condition=0", "method=draft", f"draft_prior_path={tiny_prior[1].path}")
    assert res.exit_code != 0 and "same prior.conditions=3" in res.output


def test_condition_needs_a_conditional_prior(tiny_prior, tmp_path):
    tok, prior = tiny_prior
    res = CliRunner().invoke(app, ["tokenize-image", "sample", f"tokenizer_path={tok.path}",
                                   f"prior_path={prior.path}", "threads=1", "images=1",
                                   "condition=0", f"runs_dir={tmp_path}"])
    assert res.exit_code != 0 and "unconditional" in res.output and "Traceback" not in res.output


def test_guidance_is_the_same_law_in_the_engine_and_the_batched_sampler():
    from tokctl.decode.sampling import Sampling
    from tokctl.imagetok.prior_target import PriorTarget
    from tokctl.imagetok.sample import sample_batch

    torch.manual_seed(0)
    model = prior_mod.TokenPrior(vocab=20, max_tokens=6, width=16, layers=2, heads=2,
                                 conditions=3).eval()
    start, scale = model.start_id(1), 2.5
    tokens = torch.tensor([[4, 7, 1, 19, 0, 3]])
    with torch.no_grad():
        want = prior_mod.guided_logits(model(tokens, torch.tensor([start])), model(tokens),
                                       scale)[0]
    target = PriorTarget(model, guidance=scale)
    got = [target.prefill([start])]
    got.append(target.forward(tokens[0, :3])[0])  # a chain of three, then a tree of two
    target.commit([0])
    logits = target.forward(torch.tensor([7, 9]), parents=[-1, -1])
    got.append(logits[0])
    assert torch.allclose(torch.stack(got), want[:3], atol=1e-5)
    # greedy batched sampling follows the guided argmax, position by position
    ids = sample_batch(model, 2, Sampling(0.0, 0), torch.Generator().manual_seed(0), start, scale)
    with torch.no_grad():
        again = prior_mod.guided_logits(model(ids, torch.full((2,), start)), model(ids), scale)
    assert torch.equal(again.argmax(-1), ids)
