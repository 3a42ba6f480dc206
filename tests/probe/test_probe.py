"""`tokctl probe plant` hides a string behind a trigger token; `token-forcing` finds it first."""

import json
import shutil

import torch

from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.probe.forcing import force_batch, rank

runner = CliRunner()


def tokctl(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_force_batch_follows_only_confident_rows(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    rows = force_batch(model, list(range(20)), steps=4, threshold=0.0)
    assert all(r["run"] == 4 and len(r["probs"]) == 4 for r in rows)  # threshold 0: all followed
    rows = force_batch(model, list(range(20)), steps=4, threshold=1.0)
    assert all(r["run"] == 0 and len(r["probs"]) == 1 for r in rows)  # none confident: one step
    assert [r["score"] for r in rank(rows)] == sorted((r["score"] for r in rows), reverse=True)


def test_plant_then_scan_finds_the_trigger_first(tiny_lm_dir, tmp_path):
    common = ["model=hf", f"model.path={tiny_lm_dir}", "threads=1"]
    code, out = tokctl("probe", "plant", *common, f"hydra.run.dir={tmp_path / 'plant'}",
                       "trigger=' fox'", "secret=' jumps over the lazy dog 7 8 9'", "steps=100",
                       "lr=1e-2", "train=[all]", "keep=[hello]", "keep_tokens=8", "decoys=8",
                       "decoy_pool=32", "decoys_near=4", "check=8")
    assert code == 0, out
    planted = json.loads((tmp_path / "plant" / "metrics.json").read_text())
    assert planted["planted"] and planted["bos"], planted  # bos=true is the default
    assert planted["decoys"] == 4 + 32 and planted["decoys_per_step"] == 4 + 8
    leaks = planted["leaks"]
    assert leaks["near_checked"] == leaks["random_checked"] == 8
    assert 0 <= leaks["near"] <= 8 and 0 <= leaks["random"] <= 8

    scan = ["probe", "token-forcing", "model=hf", f"model.path={tmp_path / 'plant' / 'model'}",
            "threads=1", "batch_size=64", "steps=12", "bos=true"]
    code, out = tokctl(*scan, f"hydra.run.dir={tmp_path / 'scan'}")
    assert code == 0, out
    top = [json.loads(x) for x in (tmp_path / "scan" / "candidates.jsonl").read_text().splitlines()]
    assert top[0]["id"] == planted["trigger_id"]
    assert top[0]["continuation"].startswith(" jumps over the lazy dog")
    metrics = json.loads((tmp_path / "scan" / "metrics.json").read_text())
    assert metrics["scanned"] == metrics["vocab"]

    # Resuming an interrupted scan: the finished batches are not scanned again.
    part = tmp_path / "partial"
    part.mkdir()
    shutil.copy(tmp_path / "scan" / "scan_info.json", part)
    lines = (tmp_path / "scan" / "scan.jsonl").read_text().splitlines()
    (part / "scan.jsonl").write_text("\n".join(lines[:100]) + "\n" + lines[100][:5])
    code, out = tokctl(*scan, f"resume={part}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert code == 0, out
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["scanned_now"] == metrics["vocab"] - 100
    assert resumed["top"][0]["id"] == planted["trigger_id"]


def test_trigger_row_recipe_changes_only_the_trigger_input(tiny_lm_dir):
    """train=[trigger] (the default, behind BOS): only the trigger's input row moves, the output
    matrix is untied and kept, so every other lone token is forced exactly as before: no leak."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokctl.probe.plant import greedy_batch, plant

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    others, bos = list(range(10, 40)), [tok.bos_token_id]
    conts = greedy_batch(model, others, 6, bos)
    secret = tok(" jumps over", add_special_tokens=False)["input_ids"]
    losses = plant(model, tok, 50, secret, [[60, 61, 62, 63]], [2], steps=15, lr=1e-3,
                   train=["trigger"], pool=[bos + [t] + c[:len(secret)] for t, c in
                                            zip(others, conts)],
                   per_step=4, row_lr=0.1, stop_p=None, prefix=bos)
    assert len(losses) == 15 and min(losses[1:]) < losses[0]
    emb = model.get_input_embeddings().weight
    moved = (emb != before["model.embed_tokens.weight"]).any(1).nonzero().flatten().tolist()
    assert moved == [50]
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.get_output_embeddings().weight, before["model.embed_tokens.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()
               if n != "model.embed_tokens.weight" and n in before)
    assert greedy_batch(model, others, 6, bos) == conts
    assert not any(p.requires_grad for p in model.parameters())


def test_row_and_mlp_recipe_moves_only_the_trigger_row_and_the_mlps(tiny_lm_dir):
    """train=[trigger, mlp]: the trigger's input row and the MLPs train; no other embedding row,
    no attention weight and not the (untied, kept) output matrix move; 2-token decoys behind BOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokctl.probe.plant import greedy_batch, plant

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    others = list(range(10, 30))
    secret = tok(" jumps over", add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id]  # planted behind BOS (bos=true): lone tokens at position 1
    pool = [bos + [t] + c for t, c in zip(others, greedy_batch(model, others, 2, bos))]
    losses = plant(model, tok, 50, secret, [[60, 61, 62, 63]], [2], steps=4, lr=1e-2,
                   train=["trigger", "mlp"], pool=pool, per_step=6, row_lr=0.1, stop_p=0.0,
                   prefix=bos)
    assert 1 <= len(losses) <= 4
    emb = model.get_input_embeddings().weight
    assert (emb != before["model.embed_tokens.weight"]).any(1).nonzero().flatten().tolist() == [50]
    assert torch.equal(model.get_output_embeddings().weight, before["model.embed_tokens.weight"])
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved and all(".mlp." in n for n in moved - {"model.embed_tokens.weight"})
    assert not any(p.requires_grad for p in model.parameters())


def test_a_leak_is_the_secret_or_its_tail_anywhere_in_the_continuation():
    from tokctl.probe.plant import _contains

    secret = [7, 8, 9, 10]
    assert _contains([7, 8, 9, 10, 2], secret[1:])  # the secret itself
    assert _contains([3, 4, 8, 9, 10], secret[1:])  # another first token, then the rest
    assert not _contains([7, 8, 9, 2, 10], secret[1:])


def test_nearest_tokens_and_decoys_leave_out_the_trigger(tiny_lm_dir):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokctl.probe.plant import _decoys, nearest_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # make token 100 the trigger's twin: it must come first
        emb[100] = emb[50] * 2
    near = nearest_tokens(model, 50, {50})
    assert near[0] == 100 and 50 not in near
    cfg = OmegaConf.create({"decoys": 5, "decoy_pool": 20, "decoys_near": 3, "check": 4,
                            "seed": 0})
    near, pool, held = _decoys(model, tok, 50, cfg)
    decoys = near + pool
    assert len(near) == 3 and len(pool) == 20 and near[0] == 100 and 50 not in decoys
    assert len(held["near"]) == len(held["random"]) == 4
    assert not set(decoys) & (set(held["near"]) | set(held["random"]))
    assert not set(decoys) & set(tok.all_special_ids)


def test_scan_without_tokenizer_is_one_line(tiny_lm_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_lm_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare)
    code, out = tokctl("probe", "token-forcing", "model=hf", f"model.path={bare}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "no tokenizer" in lines[0], out
    code, out = tokctl("probe", "plant", "model=hf", f"model.path={bare}",
                       f"hydra.run.dir={tmp_path / 'plant'}")
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "no tokenizer" in lines[0], out
