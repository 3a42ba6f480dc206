"""Building methods from configs: the user's mistakes are one line, a constructor's bug is not."""

import pytest

from tokctl.errors import UserError
from tokctl.instantiate import instantiate


class Method:
    def __init__(self, r: int, inflect: float = 0.0, prop_attn: bool = True):  # ToMe's options
        if r < 0:
            raise UserError(f"r={r} must be >= 0")
        self.r = 1 // (r - 13) if r == 13 else r  # a bug at r=13


def build(**options):
    return instantiate({"_target_": f"{__name__}.Method", **options}, "method test")


def test_the_users_mistakes_are_user_errors():
    assert build(r=2).r == 2
    with pytest.raises(UserError, match="no option rr .*options: r, inflect, prop_attn"):
        build(rr=2)
    with pytest.raises(UserError, match="option r must be set"):
        build()
    with pytest.raises(UserError, match="r=-1 must be >= 0"):
        build(r=-1)
    with pytest.raises(UserError, match="cannot be imported"):
        instantiate({"_target_": "tokctl.no_such_module.Thing"}, "method x")


def test_a_bug_in_the_constructor_keeps_its_type_and_traceback():
    with pytest.raises(ZeroDivisionError) as info:
        build(r=13)
    assert any("__init__" in str(entry.name) for entry in info.traceback)


def test_a_bug_in_a_job_is_failed_with_error_txt(tmp_path):
    """Through the job runner: status failed, the traceback in error.txt, not a user error."""
    from tokctl.jobs import JOBS, JobCrashed, run_single

    overrides = ["model=vit_b16_random", "model.hidden_size=32", "model.num_hidden_layers=2",
                 "model.num_attention_heads=2", "model.intermediate_size=64",
                 "model.image_size=32", "model.patch_size=4", "data=synthetic",
                 "data.num_images=2", "threads=1", f"hydra.run.dir={tmp_path / 'run'}",
                 f"method._target_={__name__}.Method", "method.r=13"]
    with pytest.raises(JobCrashed, match="ZeroDivisionError"):
        run_single(JOBS["compress-vit"], overrides)
    assert (tmp_path / "run" / "status").read_text().strip() == "failed"
    assert "Traceback" in (tmp_path / "run" / "error.txt").read_text()
