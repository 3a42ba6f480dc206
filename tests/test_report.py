"""`tokctl runs compare` and `tokctl report`: rankings, labels, the PNGs and the markdown summary.

Run folders are written here by hand, with the metrics.json keys each command's job writes, so
the reports are tested without running the jobs; one test makes a real decode sweep.
"""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tokctl.cli import app

runner = CliRunner()


def tokctl(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def make_run(folder: Path, command: str, config: dict, metrics: dict | None,
             status: str = "completed") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "env.json").write_text(json.dumps({"command": command}))
    (folder / "status").write_text(status + "\n")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def decode_metrics(speed: dict[str, float], accepted: float) -> dict:
    per = {c: {"speedup": s, "speedup_q25": s * 0.9, "speedup_q75": s * 1.1,
               "mean_accepted_tokens": accepted, "tokens_per_s": 10 * s} for c, s in speed.items()}
    overall = sum(speed.values()) / len(speed)
    return {"speedup": overall, "speedup_median": overall, "speedup_q25": overall * 0.9,
            "speedup_q75": overall * 1.1, "tokens_per_s": 10 * overall,
            "baseline_tokens_per_s": 10.0, "mean_accepted_tokens": accepted,
            "identical_to_baseline": 1.0, "num_samples": 8, "baseline": "ar", "per_category": per}


@pytest.fixture
def decode_sweep(tmp_path):
    sweep = tmp_path / "runs" / "decode" / "2026-01-01" / "10-00-00_sweep"
    for num, (method, k, speed, acc) in enumerate([
            ("ar", None, {"code": 1.0, "math": 1.0, "chat": 1.0}, 1.0),
            ("recycling", 4, {"code": 2.1, "math": 1.6, "chat": 1.4}, 2.6),
            ("recycling", 8, {"code": 2.4, "math": 1.7, "chat": 1.3}, 2.9)]):
        cfg = {"name": f"{method}-vs-ar", "method": {"name": method, "k": k,
                                                     "_target_": f"x.{method}"},
               "baseline": "ar", "max_new_tokens": 64, "runs_dir": "runs"}
        make_run(sweep / str(num), "decode", cfg, decode_metrics(speed, acc))
    make_run(sweep / "3", "decode", {"name": "lade-vs-ar", "method": {"name": "lade", "k": None},
                                     "baseline": "ar", "max_new_tokens": 64}, None,
             status="interrupted")
    return sweep


def md_rows(md: str) -> list[list[str]]:
    """The cells of every markdown table row, header included, separator rows left out."""
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines()
            if ln.startswith("|") and not set(ln) <= set("|-: ")]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# ------------------------------------------------------------------------------ runs compare
def test_compare_ranks_runs_with_the_settings_that_differ(decode_sweep):
    code, out = tokctl("runs", "compare", decode_sweep, "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert [r["config"].get("method.k") for r in rows[:3]] == [8, 4, None]  # best speedup first
    assert set(rows[0]["config"]) == {"method.name", "method.k"}  # name/_target_ are not settings
    assert rows[-1]["status"] == "interrupted"  # no metrics: ranked last

    code, out = tokctl("runs", "compare", decode_sweep, "-k", "per_category.math.speedup",
                       "-k", "mean_accepted_tokens", "--json")
    assert [r["metrics"]["per_category.math.speedup"] for r in json.loads(out)[:3]] == [1.7, 1.6, 1.0]
    code, out = tokctl("runs", "compare", decode_sweep, "-k", "speedup", "--ascending", "--json")
    assert json.loads(out)[0]["config"]["method.name"] == "ar"

    code, out = tokctl("runs", "compare", decode_sweep)
    assert code == 0 and "ranked by speedup (highest first)" in out and "recycling" in out


def test_compare_ranks_costs_lowest_first(tmp_path):
    for r, gflops in ((0, 4.6), (8, 3.1), (16, 2.2)):
        make_run(tmp_path / f"r{r}", "compress-vit", {"method": {"name": "tome", "r": r}},
                 {"gflops": gflops, "top1": 0.8 - r / 100})
    code, out = tokctl("runs", "compare", tmp_path, "-k", "gflops", "--json")
    assert [row["config"]["method.r"] for row in json.loads(out)] == [16, 8, 0]


def test_compare_refuses_mixed_commands_and_unknown_metrics(decode_sweep, tmp_path):
    other = make_run(tmp_path / "vit", "compress-vit", {"method": {"name": "tome"}}, {"top1": 0.5})
    code, out = tokctl("runs", "compare", decode_sweep, other)
    assert code == 2 and "different commands" in out
    code, out = tokctl("runs", "compare", decode_sweep, "-k", "nope")
    assert code == 2 and "no run has metric(s) nope" in out
    code, out = tokctl("runs", "compare", tmp_path / "missing")
    assert code == 2 and "no such run folder" in out


def test_listing_commands_speak_json(decode_sweep):
    code, out = tokctl("runs", "ls", decode_sweep.parent.parent.parent, "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 4 and {r["command"] for r in rows} == {"decode"}
    code, out = tokctl("runs", "show", decode_sweep / "1", "--json")
    shown = json.loads(out)
    assert shown["config"]["method"]["k"] == 4 and shown["metrics"]["speedup"] > 1


@pytest.fixture
def narrow(monkeypatch):
    """An 80-column terminal."""
    from tokctl.console import console

    monkeypatch.setattr(console, "_width", 80)


def test_compare_fits_80_columns_metrics_first(decode_sweep, narrow):
    make_run(decode_sweep / "4", "decode", {"name": "x", "method": {"name": "lookup"},
                                            "baseline": "ar", "max_new_tokens": 64}, None,
             status="failed")
    code, out = tokctl("runs", "compare", decode_sweep)
    assert code == 0, out
    lines = out.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= 80
    header = next(ln for ln in lines if "speedup" in ln and "settings" in ln)
    # the headline metrics come before the settings, which come before the folder
    cols = header.split()
    assert cols == ["#", "speedup", "tok/step", "identical", "n", "settings", "run"]
    body = lines[lines.index(header) + 2:]
    body = body[:next(i for i, ln in enumerate(body) if ln.startswith("speedup:"))]  # the caption
    rows = [ln.split() for ln in body if ln.strip()]
    assert [r[0] for r in rows] == ["1", "2", "3", "-"]  # the interrupted run: ranked apart
    assert rows[0][1:5] == ["1.80x", "2.90", "100%", "8"] and "k=8" in " ".join(rows[0])
    assert "(interrupted)" in rows[-1] and "failed" not in out.replace("1 failed run hidden", "")
    assert "1 failed run hidden (--all shows them)" in out

    code, out = tokctl("runs", "compare", decode_sweep, "--all", "--json")
    rows = json.loads(out)
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["interrupted", "failed"]
    assert [r["rank"] for r in rows] == [1, 2, 3, None, None]


def test_compare_writes_csv_for_scripts(decode_sweep):
    import io

    import pandas as pd

    code, out = tokctl("runs", "compare", decode_sweep, "--csv")
    assert code == 0, out
    df = pd.read_csv(io.StringIO(out))
    assert list(df.columns[:5]) == ["rank", "path", "status", "n", "label"]
    assert df["speedup"].iloc[0] == pytest.approx(1.8) and "per_category.math.speedup" in df
    assert list(df["label"]) == ["recycling, k=8", "recycling, k=4", "ar", "lade"]


def test_ls_groups_by_folder_and_never_wraps_paths_or_cuts_metrics(decode_sweep, narrow):
    root = decode_sweep.parent.parent.parent
    make_run(decode_sweep / "4", "decode", {"method": {"name": "lookup"}}, None, status="failed")
    code, out = tokctl("runs", "ls", root)
    assert code == 0, out
    lines = out.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= 80
    assert "decode/2026-01-01/10-00-00_sweep/" in out  # the folder once, whole, on one line
    assert "1 failed run hidden" in out
    points = [ln.split() for ln in lines if ln.startswith("  ")]
    assert [p[:2] for p in points] == [["0", "completed"], ["1", "completed"],
                                       ["2", "completed"], ["3", "interrupted"]]  # grid order
    assert points[1][2:] == ["n=8", "speedup=1.70x", "tok/step=2.60", "identical=100%"]
    code, out = tokctl("runs", "ls", root, "--all")
    assert ["4", "failed"] in [ln.split()[:2] for ln in out.splitlines()] and "hidden" not in out


def test_show_keeps_long_keys_whole(decode_sweep, narrow):
    code, out = tokctl("runs", "show", decode_sweep / "1")
    assert code == 0, out
    assert "per_category.chat.mean_accepted_tokens" in out
    assert out.index("speedup") < out.index("config")  # metrics first
    path, *rest = out.splitlines()
    assert path == str(decode_sweep / "1")  # whole on its line, to copy; the rest fits
    assert max(len(ln.rstrip()) for ln in rest) <= 80


def eval_metrics(shift: float) -> dict:
    entries = []
    for tokens in (8, 16, 32, 64):
        entries.append({"codec": "onedpiece", "kind": "tokenizer", "tokens": tokens,
                        "bytes_target": 12 + tokens, "bytes_per_image": 12.0 + tokens,
                        "ssim": 0.3 + tokens / 200 + shift, "psnr": 18 + tokens / 10,
                        "ms_ssim": 0.5, "rfid": 200 - tokens})
        entries.append({"codec": "jpeg", "kind": "classical", "bytes_target": 12 + tokens,
                        "bytes_per_image": 300.0, "ssim": 0.45, "psnr": 20.0, "ms_ssim": 0.6,
                        "rfid": 150.0, "over_budget": 10})
    return {"images": 4, "image_size": 64, "tokenizers": [{"label": "onedpiece"}],
            "entries": entries, "curves": {}}


def test_compare_eval_runs_by_image_quality(tmp_path, narrow):
    for name, shift in (("a", 0.0), ("b", 0.1)):
        make_run(tmp_path / name, "tokenize-image eval",
                 {"tokenizer_path": f"/x/{name}.pt", "data": {"limit": 4}}, eval_metrics(shift))
    code, out = tokctl("runs", "compare", tmp_path)
    assert code == 0, out
    assert "ranked by SSIM (highest first)" in " ".join(out.split())
    header = next(ln for ln in out.splitlines() if "SSIM" in ln and "settings" in ln)
    assert header.split()[:7] == ["#", "SSIM", "PSNR", "dB", "rFID", "bytes", "tokens"]
    code, out = tokctl("runs", "compare", tmp_path, "--json")
    rows = json.loads(out)
    assert [r["label"] for r in rows] == ["tokenizer_path=x/b.pt", "tokenizer_path=x/a.pt"]
    assert rows[0]["metrics"] == {"ssim": pytest.approx(0.72), "psnr": pytest.approx(24.4),
                                  "rfid": 136, "bytes_per_image": 76.0, "tokens": 64}
    code, out = tokctl("runs", "compare", tmp_path, "-k", "onedpiece@8.ssim", "-k",
                       "jpeg@20.ssim", "--json")
    assert json.loads(out)[0]["metrics"] == {"onedpiece@8.ssim": pytest.approx(0.44),
                                             "jpeg@20.ssim": 0.45}


# ------------------------------------------------------------------------------------ report
def test_decode_report_plots_speedup_per_category_per_method(decode_sweep, tmp_path):
    out = tmp_path / "report"
    code, printed = tokctl("report", decode_sweep, "--out", out, "--json")
    assert code == 0, printed
    result = json.loads(printed)
    files = {Path(f["file"]).name for f in result["figures"]}
    assert files == {"decode_speedup.png", "decode_accepted.png"}
    for name in files:
        w, h = png_size(out / name)
        assert w > 500 and h > 300
    md = (out / "report.md").read_text()
    assert "![Speedup per category per method](decode_speedup.png)" in md
    # ranked by speedup; each run named by what sets it apart
    assert [row[0] for row in md_rows(md)[1:]] == ["recycling, k=8", "recycling, k=4", "ar"]
    assert "Not plotted (not completed)" in md and "(interrupted)" in md


def vit_metrics(r: int, method: str) -> dict:
    return {"method": method, "images_per_s": 100 + 12 * r, "baseline_images_per_s": 100.0,
            "speedup": 1 + 0.12 * r, "gflops": 4.6 - 0.15 * r, "baseline_gflops": 4.6,
            "flops_ratio": 1 - r / 30, "top1": 0.81 - 0.004 * r * r / 4, "baseline_top1": 0.81,
            "agreement": 1 - 0.01 * r}


def test_compress_vit_report_plots_accuracy_against_throughput_and_flops(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (method, r) in enumerate([("tome", 0), ("tome", 4), ("tome", 8), ("tome", 12),
                                     ("evit", 4), ("evit", 8)]):
        make_run(sweep / str(i), "compress-vit", {"method": {"name": method, "r": r}},
                 vit_metrics(r, method))
    code, printed = tokctl("report", sweep, "--out", tmp_path / "rep", "--json")
    assert code == 0, printed
    names = [Path(f["file"]).name for f in json.loads(printed)["figures"]]
    assert names == ["compress_vit_accuracy_vs_throughput.png", "compress_vit_accuracy_vs_flops.png"]
    for name in names:
        png_size(tmp_path / "rep" / name)
    md = (tmp_path / "rep" / "report.md").read_text()
    # the sentence beside each plot says where better lies in that plot's own axes
    assert "better trade-offs lie up and to the right" in md
    assert "better trade-offs lie up and to the left" in md
    header, *rows = md_rows(md)
    assert header[:5] == ["run", "top-1", "baseline top-1", "agree", "speedup"]
    # named as the README says: the method, then what sets the run apart
    assert [row[0] for row in rows][:3] == ["tome, r=0", "tome, r=4", "evit, r=4"]


def test_tokenize_image_report_plots_rate_distortion(tmp_path):
    entries, curves = [], {}
    for tokens in (8, 16, 32, 64):
        entries.append({"codec": "onedpiece", "kind": "tokenizer", "tokens": tokens,
                        "bytes_per_image": 12 + 1.25 * tokens, "ssim": 0.3 + tokens / 200,
                        "psnr": 18 + tokens / 10, "ms_ssim": 0.5, "rfid": 200 - tokens})
        for codec in ("jpeg", "webp"):
            entries.append({"codec": codec, "kind": "classical", "bytes_target": 12 + tokens,
                            "bytes_per_image": 300.0, "ssim": 0.45, "psnr": 20.0,
                            "ms_ssim": 0.6, "rfid": 150.0, "over_budget": 10})
    for codec, floor in (("jpeg", 370), ("webp", 210)):
        curves[codec] = [{"quality": q, "bytes_per_image": floor + 8 * q, "ssim": 0.45 + q / 250,
                          "psnr": 20 + q / 10, "ms_ssim": 0.6} for q in (1, 10, 30, 60, 90)]
    metrics = {"images": 10, "image_size": 64, "entries": entries, "curves": curves}
    make_run(tmp_path / "eval", "tokenize-image", {"tokenizer_path": None, "data": {"path": None}},
             metrics)
    code, printed = tokctl("report", tmp_path / "eval", "--out", tmp_path / "rep", "--json")
    assert code == 0, printed
    assert [Path(f["file"]).name for f in json.loads(printed)["figures"]] == [
        "tokenize_image_rate_distortion.png"]
    w, h = png_size(tmp_path / "rep" / "tokenize_image_rate_distortion.png")
    assert w > 3 * h / 2  # three panels side by side: SSIM, PSNR, rFID
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = md_rows(md)
    assert rows[0][:4] == ["run", "codec", "tokens", "target"]
    assert ["eval", "onedpiece", "8"] in [row[:3] for row in rows]
    assert ["eval", "webp", "-", "20"] in [row[:4] for row in rows]


def test_one_report_covers_several_commands_and_says_what_it_cannot_plot(decode_sweep, tmp_path):
    make_run(tmp_path / "train", "compress-vit train", {"train": {"epochs": 1}},
             {"val_top1": 0.6, "train_images_per_s": 35.0})
    code, printed = tokctl("report", decode_sweep, tmp_path / "train", "--out", tmp_path / "rep")
    assert code == 0, printed
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## decode: 4 run(s)" in md and "## compress-vit train: 1 run(s)" in md
    assert "(no plot for this command)" in md and "val_top1" in md


def test_report_bad_places_fail_in_one_line(decode_sweep, tmp_path):
    code, out = tokctl("report", tmp_path / "nowhere", "--out", tmp_path / "rep")
    assert code == 2 and "no such run folder" in out
    (tmp_path / "file").write_text("x")
    code, out = tokctl("report", decode_sweep, "--out", tmp_path / "file" / "rep")
    assert code == 2 and "cannot create the report folder" in out


def test_report_of_a_real_decode_sweep(tiny_lm_dir, tmp_path):
    code, out = tokctl("decode", "-m", "method=ar,hf", "model=hf", f"model.path={tiny_lm_dir}",
                       "data.per_category=1", "max_new_tokens=4", "warmup=0", "threads=1",
                       f"hydra.sweep.dir={tmp_path / 's'}")
    assert code == 0, out
    code, out = tokctl("report", tmp_path / "s", "--out", tmp_path / "rep", "--json")
    assert code == 0, out
    assert len(json.loads(out)["figures"]) == 2
    md = (tmp_path / "rep" / "report.md").read_text()
    assert sorted(row[0] for row in md_rows(md)[1:]) == ["ar", "hf"]


def test_labels_name_a_method_by_its_own_options_only_where_they_differ(tmp_path):
    from tokctl.report import label_runs, load_records

    for i, (method, opts) in enumerate([("ar", {}), ("lookup", {"max_ngram": 3}),
                                        ("recycling", {"k": 4}), ("recycling", {"k": 8})]):
        make_run(tmp_path / str(i), "decode",
                 {"method": {"name": method, **opts}, "max_new_tokens": 64 * (1 + i % 2)},
                 {"speedup": 1.0})
    records = load_records([tmp_path])
    label_runs(records)
    assert [r.label for r in records] == ["ar, max_new_tokens=64", "lookup, max_new_tokens=128",
                                          "recycling, k=4, max_new_tokens=64",
                                          "recycling, k=8, max_new_tokens=128"]


def test_methods_measured_together_in_one_run_each_get_their_bars(tmp_path):
    metrics = decode_metrics({"code": 1.2, "math": 1.1}, 1.4)
    metrics.update(method="recycling", also={"lookup": decode_metrics({"code": 1.6, "math": 1.3}, 1.9),
                                             "hybrid": decode_metrics({"code": 1.8, "math": 1.2}, 2.1)})
    make_run(tmp_path / "run", "decode", {"method": {"name": "recycling"}, "also": ["lookup", "hybrid"]},
             metrics)
    code, out = tokctl("report", tmp_path / "run", "--out", tmp_path / "rep")
    assert code == 0, out
    rows = md_rows((tmp_path / "rep" / "report.md").read_text())
    assert [row[0] for row in rows[1:]] == ["hybrid", "lookup", "recycling"]  # by overall speedup
