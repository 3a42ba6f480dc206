"""The compress-vit job in-process on a tiny random ViT: metrics, run files, bad inputs."""

import json

import numpy as np
import pytest
from PIL import Image

from tokctl.errors import UserError
from tokctl.jobs import JOBS, run_single

TINY = ["model=vit_b16_random", "model.hidden_size=32", "model.num_hidden_layers=3",
        "model.num_attention_heads=2", "model.intermediate_size=64", "model.image_size=32",
        "model.patch_size=4", "model.num_labels=5", "threads=1", "batch_size=4", "warmup=1",
        "fidelity_images=4", "vis.images=2"]


def _folder(tmp_path, n=6, broken=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    if broken:
        (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    return tmp_path


def _run(tmp_path, *overrides):
    status, path = run_single(JOBS["compress-vit"], TINY + [f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    return status, path, json.loads((path / "metrics.json").read_text())


def test_tome_on_an_image_folder(tmp_path):
    images = _folder(tmp_path / "imgs")
    status, path, m = _run(tmp_path, "method=tome", "method.r=4", "data=folder", f"data.path={images}")
    assert status == "completed"
    for key in ("images_per_s", "baseline_images_per_s", "speedup", "gflops", "baseline_gflops", "top1",
                "baseline_top1", "agreement", "kl", "tokens_per_layer", "patch_feature_cosine"):
        assert key in m
    assert set(m) >= {"speedup", "speedup_median", "speedup_q25", "speedup_q75"}
    assert m["speedup_q25"] <= m["speedup_median"] <= m["speedup_q75"]
    assert m["kernel"] == "reference"  # CPU tensors: the torch merge, and metrics.json says so
    assert m["top1"] is None and m["baseline_top1"] is None  # unlabelled folder
    assert m["num_images"] == 6 and m["images_skipped"] == 1 and m["skipped"][0].startswith("bad.png")
    assert m["tokens_per_layer"] == [65, 61, 57] and m["gflops"] < m["baseline_gflops"]
    assert (path / "merges.png").is_file() and (path / "skipped.txt").is_file()
    assert len((path / "samples.jsonl").read_text().splitlines()) == 2  # one row per batch


def test_diffrate_searches_on_held_out_images_and_saves_rates(tmp_path):
    images = _folder(tmp_path / "imgs", n=10, broken=False)
    status, path, m = _run(tmp_path, "method=diffrate", "method.search.steps=3", "method.search.batch_size=2",
                           "calibration.images=4", "data=folder", f"data.path={images}")
    assert m["num_images"] == 6  # the 4 calibration images are not evaluated
    rates = json.loads((path / "diffrate_rates.json").read_text())
    assert len(rates["prune_kept"]) == 3


def test_calibration_without_the_training_split_is_a_warning_and_a_field(tmp_path, capsys):
    import gzip

    root = tmp_path / "fm"  # the test split only: the training split cannot be found here
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, array in (("t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (12, 28, 28))),
                        ("t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (12,)))):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(root / name, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    status, _, m = _run(tmp_path, "method=diffrate", "method.search.steps=2",
                        "method.search.batch_size=2", "calibration.images=4", f"data.root={root}",
                        "data.limit=null")
    assert status == "completed"
    assert "train split not found" in m["calibration_fallback"]
    assert m["calibration"].startswith("the last 4 images") and m["num_images"] == 8
    assert "warning" in capsys.readouterr().out


@pytest.mark.parametrize("overrides,message", [
    (["method=tome", "method.r=-1", "data=synthetic", "data.num_images=2"], ">= 0"),
    (["data=folder", "data.path=/nonexistent/folder"], "does not exist"),
    (["batch_size=0", "data=synthetic"], "batch_size"),
    (["method=cluster", "method.clusters=[20,20]", "data=synthetic", "data.num_images=2"], "finer"),
])
def test_bad_inputs_raise_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _run(tmp_path, *overrides)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        _run(tmp_path, "data=folder", f"data.path={tmp_path / 'empty'}")


def test_encoder_without_classifier_is_compared_on_its_outputs(tmp_path):
    status, path, m = _run(tmp_path, "model.family=clip", "data=synthetic", "data.num_images=4", "method.r=4")
    assert m["agreement"] is None and m["kl"] is None and 0.0 < m["output_cosine"] <= 1.0 + 1e-6
