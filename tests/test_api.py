"""The RLHFJob API models: defaults, the sample spec, and every kind of bad input naming its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberlhf import api

pytestmark = pytest.mark.unit

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("**/*.yaml"))

ISSUE_SAMPLE = """
apiVersion: kuberlhf.io/v1alpha1
kind: RLHFJob
metadata: {name: tiny-grpo}
spec:
  algorithm: grpo
  model:
    actor: builtin:tiny
  reward:
    function: rewards/digits.py:reward
  data:
    prompts: builtin:toy
    maxNewTokens: 32
  rollout:
    engine: hf
    replicas: 1
    samplesPerPrompt: 4
    promptsPerStep: 8
    temperature: 1.0
  actor:
    replicas: 1
    zeroStage: 2
    learningRate: 1.0e-3
  kl: {coef: 0.0}
  schedule: {steps: 20}
"""


def sample() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(ISSUE_SAMPLE))


def problems_of(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(api.SpecError) as info:
        api.parse_job(obj)
    return info.value.problems


def test_issue_sample_validates_with_its_values_and_defaults() -> None:
    job = api.parse_job(sample())
    assert job.spec.algorithm == "grpo"
    assert job.spec.rollout.samples_per_prompt == 4
    assert job.spec.actor.learning_rate == pytest.approx(1e-3)
    assert job.spec.data.max_new_tokens == 32
    assert job.spec.weight_sync.transport == "auto"
    assert job.spec.critic is None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path: Path) -> None:
    api.parse_job(yaml.safe_load(path.read_text()))


def test_spec_round_trips_through_its_camel_case_dict() -> None:
    job = api.parse_job(sample())
    again = api.RLHFJobSpec.model_validate(api.spec_to_dict(job.spec))
    assert again == job.spec
    assert "samplesPerPrompt" in api.spec_to_dict(job.spec)["rollout"]


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = obj
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value", "field", "hint"),
    [
        ("spec.algorithm", "grpoo", "spec.algorithm", "allowed"),
        ("spec.rollout.replicas", -1, "spec.rollout.replicas", "greater than or equal to 1"),
        ("spec.rollout.samplesPerPrompt", 1, "spec.rollout.samplesPerPrompt", "2 or more"),
        ("spec.rollout.temprature", 0.7, "spec.rollout.temprature", "unknown field"),
        ("spec.actor.zeroStage", "two", "spec.actor.zeroStage", "valid integer"),
        ("spec.actor.zeroStage", 4, "spec.actor.zeroStage", "less than or equal to 3"),
        ("spec.kl.estimator", "k4", "spec.kl.estimator", "'k1', 'k2' or 'k3'"),
        ("spec.critic", {"replicas": 1}, "spec.critic", "only ppo"),
        ("spec.model.reference", "x", "spec.model.reference", "kl.coef > 0"),
        ("spec.reward.url", "http://rm:8000", "spec.reward", "exactly one"),
        ("spec.rollout.dynamicSampling.maxRounds", 0, "spec.rollout.dynamicSampling.maxRounds",
         "greater than or equal to 1"),
        ("metadata.name", "Bad_Name", "metadata.name", "pattern"),
        ("metadata.name", "x" * 41, "metadata.name", "at most 40"),
    ],
)
def test_bad_input_names_the_field(path: str, value: Any, field: str, hint: str) -> None:
    problems = problems_of(_set(sample(), path, value))
    assert any(p.startswith(field + ":") and hint in p for p in problems), problems


def test_colocate_with_unequal_gpus_is_refused() -> None:
    obj = sample()
    obj["spec"]["placement"] = "colocate"
    obj["spec"]["rollout"]["resources"] = {"gpus": 1}
    obj["spec"]["actor"]["resources"] = {"gpus": 2}
    problems = problems_of(obj)
    assert problems == [p for p in problems if p.startswith("spec.placement:")]
    assert "placement: separate" in problems[0]


def test_colocate_with_equal_gpus_is_accepted() -> None:
    obj = sample()
    obj["spec"]["placement"] = "colocate"
    obj["spec"]["rollout"].update(replicas=2, resources={"gpus": 2})
    obj["spec"]["actor"].update(replicas=4, resources={"gpus": 1})
    assert api.parse_job(obj).spec.placement == "colocate"


def test_missing_required_fields_are_each_reported() -> None:
    obj = sample()
    del obj["spec"]["model"]
    del obj["spec"]["reward"]
    problems = problems_of(obj)
    assert "spec.model: required field is missing" in problems
    obj["spec"]["model"] = {"actor": "m"}
    assert [p for p in problems_of(obj) if p.startswith("spec.reward: online algorithms score")]


def test_wrong_kind_and_non_mapping_input_are_refused() -> None:
    obj = sample()
    obj["kind"] = "RayJob"
    assert any(p.startswith("kind:") for p in problems_of(obj))
    with pytest.raises(api.SpecError, match="expected a mapping"):
        api.parse_job(["not", "a", "job"])


def test_every_field_is_documented() -> None:
    def walk(model: type[api.BaseModel]) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, api.BaseModel):
                    missing += walk(sub)
        return missing

    assert walk(api.RLHFJobSpec) == []


# -- offline algorithms ---------------------------------------------------------------------------

ISSUE_DPO = """
apiVersion: kuberlhf.io/v1alpha1
kind: RLHFJob
metadata: {name: tiny-dpo}
spec:
  algorithm: dpo
  model: {actor: builtin:tiny}
  data:
    train: pairs.jsonl
    eval: pairs-eval.jsonl
    maxLength: 256
  dpo: {beta: 0.1, labelSmoothing: 0.0, ipo: false}
  actor: {replicas: 1, zeroStage: 2, learningRate: 5.0e-4, microBatchSize: 8}
  schedule: {epochs: 1}
"""


def offline(**spec: Any) -> dict[str, Any]:
    base = {"algorithm": "sft", "model": {"actor": "m"}, "data": {"train": "t.jsonl"}}
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "o"}, "spec": base | spec}


def test_the_issues_dpo_spec_validates_as_written_without_reward_or_rollout() -> None:
    job = api.parse_job(yaml.safe_load(ISSUE_DPO))
    assert job.spec.reward is None and job.spec.dpo is not None and job.spec.dpo.beta == 0.1
    assert job.spec.schedule.epochs == 1 and job.spec.data.max_length == 256


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"reward": {"function": "r.py:f"}}, "spec.reward"),
        ({"data": {}}, "spec.data.train"),
        ({"dpo": {"beta": 0.2}}, "spec.dpo"),
        ({"kl": {"coef": 0.1}}, "spec.kl.coef"),
        ({"placement": "colocate"}, "spec.placement"),
        ({"schedule": {"steps": 3, "epochs": 1}}, "spec.schedule"),
        ({"rollout": {"replicas": 2}}, "spec.rollout"),
        ({"data": {"train": "t.jsonl", "prompts": "p.jsonl"}}, "spec.data.prompts"),
        ({"weightSync": {"bucketMB": 8}}, "spec.weightSync"),
        ({"actor": {"epochs": 2}}, "spec.actor.epochs"),
    ],
)
def test_a_field_an_offline_algorithm_would_ignore_or_lacks_is_an_error_naming_it(
    spec: dict[str, Any], field: str
) -> None:
    problems = problems_of(offline(**spec))
    assert [p for p in problems if p.startswith(f"{field}: ")], problems


def test_defaults_filled_in_by_the_api_server_are_not_mistaken_for_settings() -> None:
    stored = offline(rollout={}, loss={}, weightSync={}, reference={}, eval={})
    stored["spec"]["rollout"] = api.RolloutSpec().model_dump(by_alias=True)
    api.parse_job(stored)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"data": {"train": "t.jsonl"}}, "spec.data.train"),
        ({"schedule": {"epochs": 2}}, "spec.schedule.epochs"),
        ({"eval": {"everySteps": 5}}, "spec.eval.prompts"),
        ({"dpo": {}}, "spec.dpo"),
    ],
)
def test_offline_only_fields_on_an_online_algorithm_are_errors_naming_them(
    spec: dict[str, Any], field: str
) -> None:
    obj = sample()
    for key, value in spec.items():
        obj["spec"][key] = value
    assert [p for p in problems_of(obj) if p.startswith(f"{field}: ")], problems_of(obj)


def test_an_offline_run_is_as_long_as_its_epochs_and_an_online_one_defaults_to_100_steps() -> None:
    spec = api.parse_job(offline(schedule={"epochs": 3}, actor={"microBatchSize": 4, "replicas": 2})).spec
    assert api.steps_to_train(spec, records=20) == 8  # ceil(3 * 20 / (4 * 2))
    online = api.parse_job(sample()).spec.model_copy(update={"schedule": api.ScheduleSpec()})
    assert api.steps_to_train(online) == 100


# -- spec.environment ------------------------------------------------------------------------


def with_environment(**environment: Any) -> dict[str, Any]:
    obj = sample()
    del obj["spec"]["reward"]
    obj["spec"]["environment"] = {"class": "calculator.py:Calculator", **environment}
    return obj


def test_an_environment_scores_an_online_run_instead_of_a_reward() -> None:
    env = api.parse_job(with_environment(maxTurns=3)).spec.environment
    assert env is not None and env.class_ == "calculator.py:Calculator" and env.max_turns == 3
    assert (env.max_tokens, env.timeout_seconds, env.max_failed_share) == (1024, 30.0, 0.5)


def test_an_environment_and_a_reward_together_or_neither_are_refused() -> None:
    both = with_environment()
    both["spec"]["reward"] = {"function": "digits.py:reward"}
    neither = sample()
    del neither["spec"]["reward"]
    message = ("spec.reward: online algorithms score their completions: set spec.reward (function, model "
               "or url) or spec.environment (multi-turn episodes), not both")
    assert problems_of(both) == [message] and problems_of(neither) == [message]


def test_an_environment_runs_on_either_engine_and_is_refused_for_offline_algorithms() -> None:
    vllm = with_environment()
    vllm["spec"]["rollout"]["engine"] = "vllm"
    assert api.parse_job(vllm).spec.environment is not None
    sft = offline(environment={"class": "env.py:Env"})
    refused = (
        "spec.environment: sft, rm, dpo train on data.train and run no episodes: remove spec.environment"
    )
    assert refused in problems_of(sft)


def test_an_environment_run_is_evaluated_on_held_out_prompts_as_episodes() -> None:
    obj = with_environment()
    obj["spec"]["eval"] = {"prompts": "held-out.jsonl", "everySteps": 5, "temperature": 0.0}
    assert api.parse_job(obj).spec.eval.prompts == "held-out.jsonl"


# -- prompt mixing and tracking ---------------------------------------------------------------------


def test_a_prompt_mix_validates_with_its_weights_and_the_per_source_cap() -> None:
    obj = sample()
    mix = [{"path": "a.jsonl", "weight": 0.7}, {"path": "builtin:toy", "weight": 3}]
    obj["spec"]["data"] = {"promptMix": mix, "maxSamples": 100}
    data = api.parse_job(obj).spec.data
    assert [(s.path, s.weight) for s in data.prompt_mix or []] == [("a.jsonl", 0.7), ("builtin:toy", 3.0)]
    assert data.max_samples == 100


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ({"promptMix": [{"path": "a.jsonl", "weight": 0}]}, "spec.data.promptMix.0.weight", "greater than 0"),
        ({"promptMix": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]},
         "spec.data.promptMix.1.weight", "required field is missing"),
        ({"promptMix": [{"path": "", "weight": 1}]}, "spec.data.promptMix.0.path", "at least 1 character"),
        ({"promptMix": []}, "spec.data.promptMix", "at least 1 item"),
        ({"promptMix": [{"path": "a.jsonl", "weight": 1}], "prompts": "p.jsonl"}, "spec.data.promptMix",
         "replaces data.prompts"),
        ({"maxSamples": 0}, "spec.data.maxSamples", "greater than or equal to 1"),
    ],
)
def test_a_bad_prompt_mix_names_the_field(data: dict[str, Any], field: str, hint: str) -> None:
    obj = sample()
    obj["spec"]["data"] = data

def test_actor_lora_defaults_to_the_attention_projections() -> None:
    job = api.parse_job(_set(sample(), "spec.actor.lora", {}))
    lora = job.spec.actor.lora
    assert lora is not None and (lora.rank, lora.alpha, lora.dropout) == (8, 16.0, 0.0)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert api.parse_job(sample()).spec.actor.lora is None


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"spec.actor.lora": {"rank": 0}}, "spec.actor.lora.rank", "greater than or equal to 1"),
        ({"spec.actor.lora": {"dropout": 1.0}}, "spec.actor.lora.dropout", "less than 1"),
        ({"spec.actor.lora": {"targetModules": []}}, "spec.actor.lora.targetModules", "at least 1"),
        (
            {"spec.actor.lora": {"targetModules": ["all-linear", "q_proj"]}},
            "spec.actor.lora.targetModules", "stands alone",
        ),
        ({"spec.actor.lora": {"targetModules": ["q proj"]}}, "spec.actor.lora.targetModules", "not module"),
        ({"spec.actor.lora": {}, "spec.actor.zeroStage": 3}, "spec.actor.lora", "zeroStage to 2"),
        (
            {"spec.actor.lora": {"targetModules": ["q_proj"]}, "spec.rollout.engine": "vllm"},
            "spec.actor.lora.targetModules", "all of a group",
        ),
        ({"spec.critic": {"lora": {}}}, "spec.critic.lora", "unknown field"),
    ],
)
def test_lora_combinations_that_cannot_work_name_the_field(
    changes: dict[str, Any], field: str, hint: str
) -> None:
    obj = sample()
    for path, value in changes.items():
        _set(obj, path, value)
    problems = problems_of(obj)
    assert any(p.startswith(field + ":") and hint in p for p in problems), problems


@pytest.mark.parametrize("field", ["promptMix", "maxSamples"])
def test_prompt_mix_settings_on_an_offline_algorithm_are_errors_naming_them(field: str) -> None:
    value = [{"path": "a.jsonl", "weight": 1}] if field == "promptMix" else 10
    problems = problems_of(offline(data={"train": "t.jsonl", field: value}))
    assert [p for p in problems if p.startswith(f"spec.data.{field}: ")], problems


def test_mlflow_tracking_validates_with_defaults_and_a_token_reference() -> None:
    obj = sample()
    obj["spec"]["tracking"] = {"mlflow": {"uri": "https://mlflow.example",
                                          "tokenSecretRef": {"name": "mlflow", "key": "token"}}}
    mlflow = api.parse_job(obj).spec.tracking.mlflow
    assert mlflow is not None and (mlflow.experiment, mlflow.run_name) == ("kuberlhf", None)
    assert api.parse_job(sample()).spec.tracking.mlflow is None


@pytest.mark.parametrize(
    ("mlflow", "field", "hint"),
    [
        ({"uri": "https://bob:hunter2@mlflow.example"}, "spec.tracking.mlflow.uri", "tokenSecretRef"),
        ({"uri": "https://bob@mlflow.example"}, "spec.tracking.mlflow.uri", "credentials"),
        ({}, "spec.tracking.mlflow.uri", "required field is missing"),
        ({"uri": "file:mlruns", "runname": "x"}, "spec.tracking.mlflow.runname", "unknown field"),
        ({"uri": "file:mlruns", "tokenSecretRef": {"name": "s"}}, "spec.tracking.mlflow.tokenSecretRef.key",
         "required field is missing"),
    ],
)
def test_bad_mlflow_tracking_names_the_field(mlflow: dict[str, Any], field: str, hint: str) -> None:
    obj = sample()
    obj["spec"]["tracking"] = {"mlflow": mlflow}
    problems = problems_of(obj)
    assert any(p.startswith(field + ":") and hint in p for p in problems), problems

def test_dynamic_sampling_is_on_only_where_asked_and_counts_its_rounds() -> None:
    assert not api.parse_job(sample()).spec.rollout.dynamic_sampling.enabled
    obj = _set(sample(), "spec.rollout.dynamicSampling", {"enabled": True, "maxRounds": 3})
    assert api.parse_job(obj).spec.rollout.dynamic_sampling.max_rounds == 3


def test_dynamic_sampling_without_a_group_estimator_or_with_async_rollouts_is_refused_naming_it() -> None:
    on = {"enabled": True}
    ppo = _set(_set(sample(), "spec.rollout.dynamicSampling", on), "spec.algorithm", "reinforce_pp")
    assert problems_of(ppo) == [
        "spec.rollout.dynamicSampling.enabled: dynamic sampling drops prompt groups whose samples all "
        "scored the same, which only group estimators (grpo, reinforce_pp_baseline, rloo, dr_grpo) learn "
        "nothing from: use one of them or set enabled: false"
    ]
    ahead = _set(_set(sample(), "spec.rollout.dynamicSampling", on), "spec.rollout.offPolicySteps", 1)
    assert problems_of(ahead) == [
        "spec.rollout.dynamicSampling.enabled: dynamic sampling refills a step from its own scores, which "
        "the rollouts generated ahead (offPolicySteps > 0) do not wait for: set rollout.offPolicySteps: 0 "
        "or enabled: false"
    ]
    single = _set(_set(sample(), "spec.rollout.dynamicSampling", on), "spec.rollout.samplesPerPrompt", 1)
    assert [p.split(":")[0] for p in problems_of(single)] == ["spec.rollout.samplesPerPrompt"]

def test_rollout_engine_defaults_to_auto_which_allows_what_either_engine_allows() -> None:
    obj = sample()
    del obj["spec"]["rollout"]["engine"]
    assert api.parse_job(obj).spec.rollout.engine == "auto"
    tp = {"spec.rollout.tensorParallelSize": 2, "spec.rollout.resources": {"gpus": 2}}
    for engine, ok in (("auto", True), ("vllm", True), ("hf", False)):
        obj = _set(sample(), "spec.rollout.engine", engine)
        for path, value in tp.items():
            _set(obj, path, value)
        if ok:
            assert api.parse_job(obj).spec.rollout.tensor_parallel_size == 2
        else:
            assert [p.split(":")[0] for p in problems_of(obj)] == ["spec.rollout.tensorParallelSize"]


def test_lora_splitting_a_fused_group_passes_with_auto_unless_tensor_parallelism_forces_vllm() -> None:
    obj = _set(sample(), "spec.rollout.engine", "auto")
    _set(obj, "spec.actor.lora", {"targetModules": ["q_proj"]})
    assert api.parse_job(obj).spec.actor.lora is not None  # auto then runs hf
    _set(obj, "spec.rollout.tensorParallelSize", 2)
    _set(obj, "spec.rollout.resources", {"gpus": 2})
    assert [p.split(":")[0] for p in problems_of(obj)] == ["spec.actor.lora.targetModules"]


def test_lora_with_vllm_accepts_whole_fused_groups() -> None:
    obj = _set(sample(), "spec.rollout.engine", "vllm")
    _set(obj, "spec.actor.lora", {"targetModules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]})
    assert api.parse_job(obj).spec.actor.lora is not None
    _set(obj, "spec.actor.lora", {"targetModules": ["all-linear"]})
    assert api.parse_job(obj).spec.actor.lora is not None
