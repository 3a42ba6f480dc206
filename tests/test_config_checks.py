"""Typed configs: every override is checked against the keys, types and `#:` annotations of the
YAML files (tokctl.schema), so typos fail in one line instead of running silently."""

import shutil

import pytest
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.config import check_sweep, compose, groups, schema_for
from tokctl.errors import UserError
from tokctl.jobs import JOBS

runner = CliRunner()


def one_error_line(*args):
    result = runner.invoke(app, list(args))
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["decode", "max_new_token=5"], ["no key max_new_token", "did you mean max_new_tokens?"]),
    (["decode", "+max_new_token=5"], ["no key max_new_token", "did you mean max_new_tokens?"]),
    (["decode", "+max_new_tokens=5"], ["already a key", "max_new_tokens=5"]),
    (["decode", "max_new_tokens=-3"], ["max_new_tokens=-3", "an int >= 1", "default 128"]),
    (["decode", "max_new_tokens=abc"], ["max_new_tokens=abc", "an int >= 1"]),
    (["decode", "model.dtype=float33"], ["one of float32, bfloat16, float16",
                                         "did you mean model.dtype=float32?"]),
    (["decode", "verify_cost=measured"], ["one of cached, measure"]),
    (["decode", "top_p=1.5"], ["top_p=1.5", "<= 1"]),
    (["decode", "metod=ar"], ["did you mean method?", "config group"]),
    (["decode", "method=lookupp"], ["no such option", "did you mean lookup?"]),
    (["decode", "method=recycling", "method.max_ngram=2"], ["is a key of method=", "lookup", "not of method=recycling"]),
    (["decode", "method.kk=4"], ["did you mean method.k?"]),
    (["decode", "evl"], ["'evl' is not an override"]),
    (["tokenize-image", "eval", "rfid=flase"], ["rfid=flase", "true or false",
                                                 "did you mean rfid=false?"]),
    (["tokenize-image", "evl"], ["no action 'evl'", "did you mean eval?"]),
    (["tokenize-image", "train", "tokenizer.mixer=lineer"], ["did you mean tokenizer.mixer=linear?"]),
    (["compress-vit", "method.r=abc"], ["method.r=abc", "int >= 0 or a list"]),
    (["compress-vit", "trian"], ["did you mean train?"]),
])
def test_typos_fail_in_one_line_naming_the_key(args, needles):
    line = one_error_line(*args)
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("overrides", [
    ["max_new_tokens=8", "method=lookup", "method.max_ngram=2", "method.budget=12"],
    ["baseline=null", "also=[lookup]", "model.dtype=bfloat16", "threads=2", "temperature=0.7"],
    ["also=[{method:recycling,budget:80,label:tr80}]", "draft_model=self:10"],
    ["max_new_tokens=${top_k}"],  # interpolations are Hydra's to check
])
def test_valid_overrides_pass(overrides):
    compose("decode", "decode", overrides)


def test_other_commands_valid_overrides_pass():
    compose("compress_vit", "compress_vit", ["method.r=[8,8,8,8,8,8,8,8]", "dtype=float16"])
    compose("compress_vit", "train", ["train.epochs=0.1"])
    compose("tokenize_image", "eval", ["rfid=false", "compare_with=[a.pt]", "budgets=[8,16]"])


def test_sweeps_are_checked_per_point():
    check_sweep("decode", "decode", ["method=ar,lookup", "max_new_tokens=8,16", "+resume=true",
                                     "hydra/launcher=local"])
    with pytest.raises(UserError, match="max_new_tokens=-3"):
        check_sweep("decode", "decode", ["max_new_tokens=8,-3"])
    with pytest.raises(UserError, match="is a key of method="):  # lookup's key on the ar point
        check_sweep("decode", "decode", ["method=ar,lookup", "method.max_ngram=2"])


def test_a_key_added_to_a_yaml_is_typed_with_no_other_edit(tmp_path, monkeypatch):
    """The project's rule: a new method is a module and a YAML; a new key, a line in a YAML."""
    from tokctl.config import conf_root

    conf = tmp_path / "conf"
    shutil.copytree(conf_root(), conf)
    (conf / "decode" / "decode.yaml").write_text(
        (conf / "decode" / "decode.yaml").read_text() + "new_knob: false\n")
    (conf / "decode" / "method" / "newm.yaml").write_text(
        "_target_: x.Y\nname: newm\nwidth: 3\nmode: fast  #: fast | slow\n")
    monkeypatch.setenv("TOKCTL_CONF_DIR", str(conf))
    cfg = compose("decode", "decode", ["new_knob=true", "method=newm", "method.width=5",
                                       "method.mode=slow"])
    assert cfg.new_knob is True and cfg.method.width == 5
    # ++key=value adds a key no YAML declares, on purpose (a job of your own, a test job)
    assert compose("decode", "decode", ["++my_job_knob=3"]).my_job_knob == 3
    for bad, needle in [("new_knob=maybe", "true or false"), ("method.width=wide", "an int"),
                        ("method.mode=fsat", "did you mean method.mode=fast?"),
                        ("method.widht=4", "did you mean method.width?")]:
        with pytest.raises(UserError, match=needle.replace("?", r"\?")):
            compose("decode", "decode", ["method=newm", bad])


def test_every_yaml_annotation_parses_and_admits_its_default():
    """Every option of every group, composed: a malformed `#:` or a default its own annotation
    refuses is a bug in conf/, caught here."""
    seen = set()
    for job in JOBS.values():
        key = (job.conf, job.config_name)
        if key in seen:
            continue
        seen.add(key)
        sch = schema_for(*key)
        picks = [()] + [(f"{g}={o}",) for g in sch.choices for o in groups(job.conf)[g]]
        for pick in picks:
            for name, spec in schema_for(*key, pick).specs.items():
                assert spec.check(spec.default) is None, (key, pick, name, spec.describe())


def test_help_lists_real_keys_and_types():
    result = runner.invoke(app, ["tokenize-image", "--help"])
    assert result.exit_code == 0
    out = result.output
    assert "Config groups" not in out  # eval has none: no empty heading
    assert "compare_with=[]" in out and "data.path=null" in out
    assert "method.k" not in out
    result = runner.invoke(app, ["decode", "--help"])
    assert "verify_cost=cached" in result.output and "cached | measure" in result.output
    assert "method.max_ngram=3" in result.output  # the example key is one the config has


def test_cfg_prints_the_config_and_runs_nothing(tmp_path):
    result = runner.invoke(app, ["decode", "max_new_tokens=7", "--cfg",
                                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    assert "max_new_tokens: 7" in result.output
    assert not (tmp_path / "run").exists()
