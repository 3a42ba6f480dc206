"""`compress-vit train` and `train-tsm` on a tiny Fashion-MNIST-format dataset: they run, resume,
and export what the eval job loads."""

import gzip
import json

import numpy as np
import pytest
import torch

from tokctl.jobs import JOBS, run_single
from tokctl.vit import default_model, fashion_mnist
from tokctl.lr_schedule import warmup_cosine
from tokctl.vit.train import augment

ARCH = ["model.hidden_size=16", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.patch_size=4", "threads=1"]


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "fm"
    root.mkdir()
    for split, n in (("train", 64), ("t10k", 16)):
        _idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def test_idx_reader(tiny_fashion):
    x, y = fashion_mnist.load("train", tiny_fashion)
    assert x.shape == (64, 28, 28) and y.shape == (64,) and y.dtype == torch.int64


def test_augment_and_schedule():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (5, 28, 28), dtype=torch.uint8)
    out = augment(images, 2, True, g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(opt, 100, 10, min_lr=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the cosine
    assert schedule.get_last_lr()[0] == pytest.approx(0.01)  # the floor at the last step
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    # a resumed run's schedule continues where it left off
    resumed = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                            100, 10, min_lr=0.01, start_step=30)
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[30])


def test_train_resume_export_then_train_tsm(tmp_path, tiny_fashion):
    data = [f"data.root={tiny_fashion}", f"data.test_root={tiny_fashion}"]
    common = ARCH + data + ["train.batch_size=16", "train.log_every=1", "train.eval_every=2",
                            "train.eval_subset=8", "train.checkpoint_every=1"]
    status, first = run_single(JOBS["compress-vit train"], common + ["train.epochs=0.5", f"hydra.run.dir={tmp_path / 'a'}"])
    assert status == "completed"
    status, second = run_single(JOBS["compress-vit train"],
                                common + ["train.epochs=1", f"resume={first}", f"hydra.run.dir={tmp_path / 'b'}"])
    rows = [json.loads(line) for line in (second / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[-1]["step"] == 4  # continued from step 2 of 4
    model = default_model.load(second / "model")
    assert model.config.num_hidden_layers == 2 and next(model.parameters()).dtype == torch.float32
    # TSM distillation from that model, then its checkpoint in the eval job.
    status, tsm_run = run_single(JOBS["compress-vit train-tsm"], [
        f"model.path={second / 'model'}", *data, "method.slim_after=[0]", "method.keep_ratio=0.5",
        "train.epochs=0.25", "train.batch_size=16", "train.eval_images=8", "train.log_every=1", "threads=1",
        f"hydra.run.dir={tmp_path / 'tsm'}"])
    assert (tsm_run / "tsm.pt").is_file()
    status, ev = run_single(JOBS["compress-vit"], [
        f"model.path={second / 'model'}", "method=tsm", f"method.checkpoint={tsm_run}", "data.kind=fashion_mnist",
        f"data.root={tiny_fashion}", "data.limit=8", "batch_size=4", "threads=1", "fidelity_images=4",
        f"hydra.run.dir={tmp_path / 'ev'}"])
    m = json.loads((ev / "metrics.json").read_text())
    assert m["tokens_per_layer"] == [50, 25] and m["top1"] is not None
