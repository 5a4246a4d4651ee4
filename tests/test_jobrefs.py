"""`job:<name>` model references: what a pipeline stage waits for and the folder it then uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuberlhf import api, jobrefs

pytestmark = pytest.mark.unit


def spec(**fields: object) -> api.RLHFJobSpec:
    body = {"model": {"actor": "job:tiny-sft"}, "reward": {"model": "job:tiny-rm"}} | fields
    return api.parse_job({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "grpo"},
                          "spec": body}).spec


def test_every_model_field_may_name_a_job_and_each_job_is_waited_for_once() -> None:
    s = spec(model={"actor": "job:tiny-sft", "tokenizer": "job:tiny-sft"})
    assert jobrefs.job_refs(s) == {"spec.model.actor": "tiny-sft", "spec.model.tokenizer": "tiny-sft",
                                   "spec.reward.model": "tiny-rm"}
    assert jobrefs.dependencies(s) == ["tiny-rm", "tiny-sft"]


def test_malformed_and_self_references_are_errors_naming_the_field() -> None:
    s = spec(model={"actor": "job:Bad_Name"}, reward={"model": "job:grpo"})
    problems = jobrefs.ref_problems(s, "grpo")
    assert problems[0].startswith("spec.model.actor: job:'Bad_Name' must name an RLHFJob")
    assert problems[1].startswith("spec.reward.model: job:grpo names this job itself")


def test_references_resolve_to_the_final_models_beside_this_jobs_output(tmp_path: Path) -> None:
    for name in ("tiny-sft", "tiny-rm"):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "config.json").write_text("{}")
    resolved = jobrefs.resolve(spec(), tmp_path)
    assert resolved.model.actor == str((tmp_path / "tiny-sft" / "final").resolve())
    assert resolved.reward is not None
    assert resolved.reward.model == str((tmp_path / "tiny-rm" / "final").resolve())


def test_a_job_that_has_not_produced_its_model_is_named_with_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"spec\.model\.actor: job:tiny-sft has no final model at .*run"):
        jobrefs.resolve(spec(), tmp_path)
