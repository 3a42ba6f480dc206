"""The train and eval jobs end to end on tiny tokenizers (composed configs, real run folders)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokctl.config import compose
from tokctl.errors import UserError
from tokctl.imagetok import fid
from tokctl.imagetok.checkpoint import load_tokenizer
from tokctl.jobs import JOBS, execute
from tests.imagetok.conftest import tiny_overrides


def test_train_writes_checkpoints_and_resumes(photo_folder, tmp_path):
    job = JOBS["tokenize-image train"]
    cfg = compose(job.conf, job.config_name, tiny_overrides(photo_folder))
    status, path = execute(job, cfg, tmp_path / "run1")
    assert status == "completed"
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["photos"] == 3
    assert "val_ssim@8" not in metrics and "val_ssim@6" in metrics  # budgets up to 6 tokens
    rows = [json.loads(l) for l in (path / "samples.jsonl").read_text().splitlines()]
    assert [r["quantized"] for r in rows] == [False, False, True, True]
    tok = load_tokenizer(path / "tokenizer.pt")
    assert tok.model.max_tokens == 6 and tok.trained["steps"] == 4

    cfg2 = compose(job.conf, job.config_name,
                   tiny_overrides(photo_folder, steps=6) + [f"resume={path}"])
    status, path2 = execute(job, cfg2, tmp_path / "run2")
    assert status == "completed"
    steps = [json.loads(l)["step"] for l in (path2 / "samples.jsonl").read_text().splitlines()]
    assert steps == [5, 6]  # continued where the first run stopped


def test_train_without_photos_is_one_clear_error(tmp_path):
    job = JOBS["tokenize-image train"]
    cfg = compose(job.conf, job.config_name, [f"data.folders=[{tmp_path}/none]"])
    with pytest.raises(UserError, match="usable photos"):
        execute(job, cfg, tmp_path / "run")


def _eval(tokenizer_file, photo_folder, tmp_path, *overrides) -> tuple[dict, Path]:
    """`tokenize-image eval` of the tiny tokenizer on the photo folder: its metrics and folder."""
    job = JOBS["tokenize-image eval"]
    cfg = compose(job.conf, job.config_name,
                  [f"tokenizer_path={tokenizer_file}", f"data.path={photo_folder}",
                   "speed_repeats=1", "threads=1", *overrides])
    status, path = execute(job, cfg, tmp_path / "eval")
    assert status == "completed"
    return json.loads((path / "metrics.json").read_text()), path


def test_eval_against_classical_codecs(tiny_tokenizer_file, photo_folder, tmp_path):
    m, path = _eval(tiny_tokenizer_file[0], photo_folder, tmp_path, "rfid=false", "avif_speed=8")
    assert (path / "rate_distortion.png").stat().st_size > 1000
    codecs = {e["codec"] for e in m["entries"]}
    assert codecs == {"onedpiece", "jpeg", "webp", "avif", "jxl"}
    tok_rows = [e for e in m["entries"] if e["codec"] == "onedpiece"]
    assert [e["tokens"] for e in tok_rows] == [6]  # max 6 tokens: the only budget
    # 64 codes = 6 bits a token: 8-byte header + 5 bytes of ids, exactly
    assert tok_rows[0]["bytes_per_image"] == 13
    for codec in ("jpeg", "webp", "avif", "jxl"):
        row = next(e for e in m["entries"] if e["codec"] == codec)
        assert row["bytes_target"] == 13 and row["over_budget"] == 3  # none fits in 13 bytes
        # over budget, each image is counted at its smallest file: the floor
        assert row["bytes_per_image"] == m["floors"][codec]["bytes_per_image"] > 13
    assert m["floors"]["avif"]["options"]["speed"] == 8
    assert m["best_by_budget"][0]["best_ssim"] == "onedpiece"
    assert set(m["speed"]) == {"onedpiece", "jpeg", "webp", "avif", "jxl"}
    for kind in ("encode", "decode"):  # the tokenizer against JPEG, interleaved, same keys
        figures = m["speed"]["onedpiece"]["vs_jpeg"][kind]
        assert set(figures) == {"speedup", "speedup_median", "speedup_q25", "speedup_q75"}
    # the folder's screenshot.png is no image: left out, named and counted, not dropped silently
    assert m["images_skipped"] == 1 and list(m["skipped"]) == ["screenshot.png"]
    assert m["monotonic_in_tokens"]["onedpiece"]["ssim"] is True


def test_eval_with_rfid(tiny_tokenizer_file, photo_folder, tmp_path, monkeypatch):
    """rfid=true (the default) runs its path end to end and gives every row an rFID; the
    Inception features are swapped for a cheap stand-in (their own test is below)."""
    from tokctl.imagetok import fid

    monkeypatch.setattr(fid, "features", lambda images: images.flatten(1)[:, :4].double().numpy())
    m, _ = _eval(tiny_tokenizer_file[0], photo_folder, tmp_path, "codecs=[jpeg]", "rfid=true")
    assert all(isinstance(e["rfid"], float) for e in m["entries"])


def test_eval_bad_budget(tiny_tokenizer_file, tmp_path):
    job = JOBS["tokenize-image eval"]
    cfg = compose(job.conf, job.config_name,
                  [f"tokenizer_path={tiny_tokenizer_file[0]}", "budgets=[99]", "rfid=false"])
    with pytest.raises(UserError, match="1 to 6"):
        execute(job, cfg, tmp_path / "eval")


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert abs(fid.frechet_distance(a, a)) < 1e-6
    assert fid.frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=0.05)


def test_frechet_distance_svd_is_the_same_distance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) * 1.5 + 0.3
    assert fid.frechet_distance_svd(a, b) == pytest.approx(fid.frechet_distance(a, b), rel=1e-6)
    a, b = rng.normal(size=(20, 50)), rng.normal(size=(25, 50))  # fewer images than features
    assert fid.frechet_distance_svd(a, b) == pytest.approx(fid.frechet_distance(a, b), rel=1e-4)


def test_precision_recall():
    """Same law: both high; generated points collapsed onto a corner of the real cloud: precision
    stays high (they lie on the real manifold), recall drops (most real points are uncovered)."""
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    p, r = fid.precision_recall(real, fake)
    assert p > 0.8 and r > 0.8
    p, r = fid.precision_recall(real, 0.1 * fake + 1.0)
    assert p > 0.8 and r < 0.3
    with pytest.raises(UserError, match="more than 3"):
        fid.precision_recall(real[:3], fake)


@pytest.mark.slow
def test_inception_features_shape():
    feats = fid.features(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


def test_best_by_budget_counts_smaller_files_within_a_budget():
    from tokctl.imagetok.evaluate import best_by_budget

    entries = [
        {"codec": "grid", "bytes_target": 80, "bytes_per_image": 80.0, "ssim": 0.49, "rfid": 380.0},
        {"codec": "oned", "bytes_target": 104, "bytes_per_image": 104.0, "ssim": 0.29, "rfid": 390.0},
        {"codec": "jpeg", "bytes_target": 104, "bytes_per_image": 348.0, "ssim": 0.45, "over_budget": 3},
    ]
    best = {row["bytes_target"]: row for row in best_by_budget(entries)}
    assert best[80]["best_ssim"] == "grid" and best[80]["candidates"] == ["grid"]
    assert best[104]["best_ssim"] == "grid" and best[104]["best_rfid"] == "grid"
    assert best[104]["candidates"] == ["grid", "oned"]  # JPEG could not reach 104 bytes


def test_default_photos_that_cannot_be_had_are_counted_not_dropped(monkeypatch):
    import skimage.data

    from tokctl.imagetok.data import eval_images

    def needs_download():
        raise OSError("would need to download coins.png")

    monkeypatch.setattr(skimage.data, "coins", needs_download)
    names, images, skipped = eval_images(None, 16)
    assert "coins" not in names and "OSError" in skipped["coins"]
    assert len(images) == len(names) > 0


def test_training_photos_that_do_not_open_are_counted(photo_folder, capsys):
    from tokctl.imagetok.data import CropSampler, warn_skipped

    (photo_folder / "torn.jpg").write_bytes(b"\xff\xd8 not much of a jpeg")
    sampler = CropSampler([str(photo_folder)], 32)
    assert len(sampler.photos) == 3 and list(sampler.skipped) == [str(photo_folder / "torn.jpg")]
    warn_skipped(sampler)
    assert "1 training photo(s) would not open" in capsys.readouterr().out


def test_eval_folders_are_read_through_imagefolder(photo_folder, tmp_path):
    from tokctl.imagetok.data import eval_images

    names, images, skipped = eval_images(str(photo_folder), 16)
    assert names == ["p0.png", "p1.png", "p2.png"] and images.shape == (3, 3, 16, 16)
    assert "cannot be opened" in skipped["screenshot.png"]
    assert eval_images(str(photo_folder), 16, limit=2)[0] == ["p0.png", "p1.png"]
    assert eval_images(str(photo_folder / "p1.png"), 16)[0] == ["p1.png"]  # one file
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    for path, message in ((tmp_path / "nope", "does not exist"),
                          (tmp_path / "empty", "holds no images"),
                          (tmp_path / "bad", "none of its images opens")):
        with pytest.raises(UserError, match=message):
            eval_images(str(path), 16)


def test_eval_coded_files_at_a_larger_size(tiny_prior, photo_folder, tmp_path):
    """image_size=40 with a 32-pixel tokenizer: 2 x 2 tiles an image; the +prior rows count
    the coded files, whose ids decode back exactly."""
    tok, prior = tiny_prior
    job = JOBS["tokenize-image eval"]
    cfg = compose(job.conf, job.config_name,
                  [f"tokenizer_path={tok.path}", f"prior_path={prior.path}",
                   f"data.path={photo_folder}", "image_size=40", "codecs=[jpeg]", "rfid=false",
                   "speed_repeats=1", "threads=1", "budgets=[3,6]"])
    status, path = execute(job, cfg, tmp_path / "eval")
    assert status == "completed"
    m = json.loads((path / "metrics.json").read_text())
    assert m["image_size"] == 40
    raw = [e for e in m["entries"] if e["codec"] == "onedpiece"]
    coded = [e for e in m["entries"] if e["codec"] == "onedpiece+prior"]
    assert [e["tiles"] for e in raw] == [4, 4]
    # plain: 8-byte header + 4 tiles x n x 6 bits
    assert [e["bytes_per_image"] for e in raw] == [8 + 9, 8 + 18]
    for r, c in zip(raw, coded):
        assert c["coded_round_trip"] and c["ssim"] == r["ssim"]
        assert c["bits_per_token"] == r["coded_bits_per_token"]
        assert c["bytes_per_image"] == r["coded_bytes_per_image"]
    assert set(m["speed"]) == {"onedpiece", "onedpiece+prior", "jpeg"}
    jpeg = next(e for e in m["entries"] if e["codec"] == "jpeg")
    assert jpeg["bytes_per_image"] > 100  # a 40x40 JPEG, headers and all


def test_eval_rate_aware_rows(tiny_prior, photo_folder, tmp_path):
    """rate_lambda > 0: the +prior rows hold the rate-aware ids (their own reconstructions, files
    that decode back to them); the plain rows keep the nearest codes."""
    tok, prior = tiny_prior
    m, _ = _eval(tok.path, photo_folder, tmp_path, f"prior_path={prior.path}", "codecs=[jpeg]",
                 "rfid=false", "budgets=[3,6]", "rate_lambda=100")
    raw = [e for e in m["entries"] if e["codec"] == "onedpiece"]
    coded = [e for e in m["entries"] if e["codec"] == "onedpiece+prior"]
    for r, c in zip(raw, coded):
        assert c["coded_round_trip"] and c["rate_lambda"] == 100
        assert c["bytes_per_image"] == r["coded_bytes_per_image"]
    assert coded[-1]["changed_tokens"] > 0 and coded[-1]["ssim"] != raw[-1]["ssim"]
    with pytest.raises(UserError, match="rate_lambda"):
        compose(JOBS["tokenize-image eval"].conf, JOBS["tokenize-image eval"].config_name,
                ["rate_lambda=-1"])


def test_eval_refined_rows(tiny_prior, photo_folder, tmp_path):
    """refine_steps > 0: every budget is encoded from latents refined for it; the rows say so,
    the coded rows still round-trip, and the reconstructions are the refined ones (that they
    score better by the refinement's objective is test_refine's)."""
    tok, prior = tiny_prior
    args = (f"prior_path={prior.path}", "codecs=[jpeg]", "rfid=false", "budgets=[3,6]")
    plain, _ = _eval(tok.path, photo_folder, tmp_path / "a", *args)
    refined, _ = _eval(tok.path, photo_folder, tmp_path / "b", *args, "refine_steps=10")
    rows = {m: {(e["codec"], e["tokens"]): e for e in r["entries"] if e["kind"] == "tokenizer"}
            for m, r in (("plain", plain), ("refined", refined))}
    for key, e in rows["refined"].items():
        assert e["refine_steps"] == 10 and rows["plain"][key]["refine_steps"] == 0
        assert e.get("coded_round_trip", True)
        assert e["ssim"] != rows["plain"][key]["ssim"]
    with pytest.raises(UserError, match="refine_rate"):  # bits weighed, but no refinement
        _eval(tok.path, photo_folder, tmp_path / "c", *args, "refine_rate=0.1")
