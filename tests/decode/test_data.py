"""Decode prompts through `datasets`: files, save_to_disk folders, cached hub ids, columns."""

import json

import datasets
import pytest
from omegaconf import OmegaConf

from tokctl.decode.data import load_prompts
from tokctl.errors import UserError


def prompts(**cfg):
    return load_prompts(OmegaConf.create(cfg))


def test_spec_bench_and_plain_prompt_lines_in_one_file(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 7, "category": "math", "turns": ["1+1?", "2+2?"]})
                 + "\n\n" + json.dumps({"prompt": "hello"}) + "\n")
    got = prompts(path=str(f), multi_turn=True)
    assert [(p.id, p.category, p.turns) for p in got] == [("7", "math", ["1+1?", "2+2?"]),
                                                         ("1", "all", ["hello"])]


def test_a_saved_dataset_with_named_columns(tmp_path):
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"instruction": ["a"], "kind": ["x"]}),
        "test": datasets.Dataset.from_dict({"instruction": ["write", "sum up", "add"],
                                            "kind": ["w", "s", "w"]}),
    })
    ds.save_to_disk(str(tmp_path / "saved"))
    got = prompts(path=str(tmp_path / "saved"), field="instruction", category_field="kind",
                  categories=["w"])
    assert [(p.category, p.turns) for p in got] == [("w", ["write"]), ("w", ["add"])]
    got = prompts(path=str(tmp_path / "saved"), split="train", field="instruction")
    assert [(p.category, p.turns) for p in got] == [("all", ["a"])]


@pytest.mark.parametrize("cfg,needle", [
    ({"field": "nope"}, "data.field=nope: no such column"),
    ({"category_field": "nope"}, "data.category_field=nope"),
    ({"split": "validation"}, "data.split=validation"),
])
def test_column_and_split_mistakes_name_the_key(tmp_path, cfg, needle):
    datasets.Dataset.from_dict({"prompt": ["hi"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match=needle):
        prompts(path=str(tmp_path / "saved"), **cfg)


def test_sources_that_are_not_there(tmp_path):
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        prompts(path="nobody/no-such-dataset-xyz")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not one written by datasets' save_to_disk"):
        prompts(path=str(tmp_path / "plain"))
    with pytest.raises(UserError, match="does not exist"):
        prompts(path=str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object"):
        prompts(path=str(bad))


def test_a_hub_dataset_from_the_local_cache_offline(tmp_path):
    """A hub id that an earlier `load_dataset` left in the datasets cache loads with no network
    (the cache entry is laid out here as `load_dataset("someone/prompts")` would leave it)."""
    import os
    import subprocess
    import sys

    src = tmp_path / "train.jsonl"
    src.write_text('{"prompt": "hello there"}\n{"prompt": "second"}\n')
    built = datasets.load_dataset("json", data_files=str(src), cache_dir=str(tmp_path / "build"))
    arrow = next((tmp_path / "build" / "json").glob("*/*/*"))
    entry = tmp_path / "hf" / "datasets" / "someone___prompts" / "default" / "0.0.0" / arrow.name
    entry.mkdir(parents=True)
    (entry / "dataset_info.json").write_bytes((arrow / "dataset_info.json").read_bytes())
    (entry / "prompts-train.arrow").write_bytes((arrow / "json-train.arrow").read_bytes())
    del built
    code = ("from omegaconf import OmegaConf\nfrom tokctl.decode.data import load_prompts\n"
            "print([p.turns[0] for p in load_prompts(OmegaConf.create({'path': 'someone/prompts'}))])")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['hello there', 'second']"
