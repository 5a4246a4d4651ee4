"""Pod templates: which Secret each container gets. A Secret in a pod's environment is readable by
every process there, so each goes only where a process uses it, and only as a secretKeyRef."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kuberlhf import api
from kuberlhf_operator import builders

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HUB_REF, REWARD_REF = {"name": "hub", "key": "token"}, {"name": "reward", "key": "bearer"}
MLFLOW_REF = {"name": "mlflow", "key": "token"}
ROLES_WITHOUT_REWARD_GROUP = {"head", "rollout", "actor"}


def secrets_by_container(reward: dict[str, object], **spec: object) -> dict[str, set[str]]:
    """Which Secret-backed variables each container of the tiny job's RayJob gets, by pod role."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    doc["spec"].update(spec)
    doc["spec"]["model"]["hubTokenSecretRef"] = HUB_REF
    doc["spec"]["reward"] = {**reward, "tokenSecretRef": REWARD_REF}
    rayjob = builders.build_rayjob(api.parse_job(doc), "default")
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"],
                 "submitter": rayjob["spec"]["submitterPodTemplate"],
                 **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}
    out = {}
    for role, template in templates.items():
        [container] = template["spec"]["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]
                for e in container.get("env", []) if "valueFrom" in e}
        assert all(ref in (HUB_REF, REWARD_REF, MLFLOW_REF) for ref in refs.values())
        out[role] = set(refs)
    return out


@pytest.mark.parametrize(("reward", "expected"), [
    # A reward function: user code in light actors; the reward token has no use at all.
    ({"function": "rewards/digits.py:reward"}, {"head": {"HF_TOKEN"}, "rollout": {"HF_TOKEN"},
                                                "actor": {"HF_TOKEN"}, "submitter": set()}),
    # A reward server: its client may run on any Ray pod, so each gets the token; none other does.
    ({"url": "https://rm.example/score"},
     {role: {"HF_TOKEN", "KUBERLHF_REWARD_TOKEN"} for role in ROLES_WITHOUT_REWARD_GROUP}
     | {"submitter": set()}),
    # A reward model built locally: its pods download nothing, so they hold no Secret.
    ({"model": "builtin:tiny"}, {"head": {"HF_TOKEN"}, "rollout": {"HF_TOKEN"}, "actor": {"HF_TOKEN"},
                                 "reward": set(), "submitter": set()}),
    ({"model": "/models/rm"}, {"head": {"HF_TOKEN"}, "rollout": {"HF_TOKEN"}, "actor": {"HF_TOKEN"},
                               "reward": set(), "submitter": set()}),
    # A reward model from the hub: its pods download it, so they get the hub token (never the server's).
    ({"model": "OpenRLHF/Llama-3-8b-rm-700k"}, {"head": {"HF_TOKEN"}, "rollout": {"HF_TOKEN"},
                                                "actor": {"HF_TOKEN"}, "reward": {"HF_TOKEN"},
                                                "submitter": set()}),
])
def test_each_secret_reaches_only_the_containers_that_use_it(reward: dict[str, object],
                                                             expected: dict[str, set[str]]) -> None:
    assert secrets_by_container(reward) == expected


def test_the_critic_and_reference_pods_get_the_hub_token_they_download_with() -> None:
    found = secrets_by_container({"function": "rewards/digits.py:reward"}, algorithm="ppo",
                                 kl={"coef": 0.05}, reference={"colocateWithActor": False})
    assert found["critic"] == found["reference"] == {"HF_TOKEN"}


def test_the_mlflow_token_reaches_only_the_head_where_the_driver_logs() -> None:
    tracking = {"mlflow": {"uri": "https://mlflow.example", "tokenSecretRef": MLFLOW_REF}}
    found = secrets_by_container({"url": "https://rm.example/score"}, tracking=tracking)
    assert found["head"] == {"HF_TOKEN", "KUBERLHF_REWARD_TOKEN", "MLFLOW_TRACKING_TOKEN"}
    assert all("MLFLOW_TRACKING_TOKEN" not in names for role, names in found.items() if role != "head"), found
    without = secrets_by_container({"url": "https://rm.example/score"},
                                   tracking={"mlflow": {"uri": "https://mlflow.example"}})
    assert "MLFLOW_TRACKING_TOKEN" not in without["head"]
