"""The offline program end to end on a local Ray: SFT, reward-model and DPO runs on the tiny
examples' data (real DeepSpeed ranks, real models), their learning, their final models and an
exact resume across two ranks at ZeRO-3."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kuberlhf.api import RLHFJob, parse_job
from kuberlhf_workers.control import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "examples" / "offline"

pytestmark = pytest.mark.slow


def offline_job(
    folder: Path, model_dir: Path, algorithm: str, train_records: int = 256, **spec: Any
) -> RLHFJob:
    """An offline spec over the first `train_records` records of the example data, laid out in
    `folder` as a user would (data files beside the spec)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "sft" if algorithm == "sft" else "prefs"
    lines = (DATA / f"{stem}-train.jsonl").read_text().splitlines()[:train_records]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(DATA / f"{stem}-eval.jsonl", folder / "eval.jsonl")
    doc = {
        "apiVersion": "kuberlhf.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": f"offline-{algorithm}"},
        "spec": {
            "algorithm": algorithm,
            "model": {"actor": str(model_dir)},
            "data": {"train": "train.jsonl", "eval": "eval.jsonl", "maxLength": 64},
            "actor": {"zeroStage": 2, "learningRate": 1e-3, "microBatchSize": 16, "globalBatchSize": 32},
            "checkpoint": {"path": "checkpoints", "everySteps": 100},
            **spec,
        },
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(doc))
    return parse_job(doc)


def run(job: RLHFJob, folder: Path, out: str, **kw: Any) -> Any:
    from kuberlhf_workers.control.offline import OfflineDriver

    return OfflineDriver(job, folder, folder / out, **kw).run()


def evals(history: list[dict[str, float]], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


def test_a_reward_model_learns_the_preference_and_scores_as_a_grpo_reward(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from kuberlhf_workers.rewards.model import RewardModelScorer

    job = offline_job(tmp_path, tiny_model_dir, "rm", schedule={"epochs": 2})
    outcome = run(job, tmp_path, "out")
    assert (outcome.status, outcome.step) == ("completed", 16)  # 2 epochs of 256 records, 32 a step
    accuracy = evals(outcome.history, "eval_accuracy")
    assert accuracy[-1] >= 0.9, outcome.history[-1]
    # The exported model is what reward.model loads: it prefers the digit-heavy reply.
    scorer = RewardModelScorer(outcome.model)
    digits, words = scorer(["Write one:", "Write one:"], ["12 345 67 8", "the cat is big"])
    assert digits > words


def test_dpo_raises_the_eval_reward_accuracy_and_margin_against_the_frozen_reference(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = offline_job(
        tmp_path,
        tiny_model_dir,
        "dpo",
        dpo={"beta": 0.1},
        eval={"everySteps": 2},
        actor={"zeroStage": 2, "learningRate": 5e-4, "microBatchSize": 16, "globalBatchSize": 32},
    )
    outcome = run(job, tmp_path, "out")
    accuracy, margin = (
        evals(outcome.history, "eval_reward_accuracy"),
        evals(outcome.history, "eval_reward_margin"),
    )
    assert len(accuracy) == 4  # steps 2, 4, 6, 8
    # At step 0 policy = reference: every implicit reward is 0 (accuracy 0, margin 0).
    assert accuracy[-1] > 0.6 and accuracy[-1] >= accuracy[0], accuracy
    assert margin[-1] > margin[0] > 0, margin
    assert (Path(outcome.model) / "model.safetensors").is_file()


def test_packed_sft_lowers_the_loss_on_the_responses_and_exports_a_generating_model(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = offline_job(
        tmp_path,
        tiny_model_dir,
        "sft",
        data={"train": "train.jsonl", "eval": "eval.jsonl", "maxLength": 64, "packing": True},
        eval={"everySteps": 4},
        schedule={"epochs": 2},
        actor={"zeroStage": 2, "learningRate": 1e-2, "microBatchSize": 16, "globalBatchSize": 32},
    )
    outcome = run(job, tmp_path, "out")
    eval_loss = evals(outcome.history, "eval_loss")
    assert eval_loss[-1] < 0.5 * eval_loss[0], eval_loss
    assert outcome.history[-1]["loss"] < outcome.history[0]["loss"]
    tokenizer = AutoTokenizer.from_pretrained(outcome.model)
    model = AutoModelForCausalLM.from_pretrained(outcome.model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    reply = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "answer" in tokenizer.decode(reply[0, prompt["input_ids"].shape[1] :]), (
        "it learned the reply's form"
    )


def test_a_stopped_and_resumed_two_rank_zero3_run_ends_exactly_like_an_unbroken_one(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    job = offline_job(
        tmp_path,
        tiny_model_dir,
        "dpo",
        train_records=128,
        dpo={"beta": 0.1},
        actor={
            "replicas": 2,
            "zeroStage": 3,
            "learningRate": 5e-4,
            "microBatchSize": 8,
            "globalBatchSize": 16,
        },
    )
    unbroken = run(job, tmp_path, "unbroken")
    stopped = run(job, tmp_path, "broken", max_steps=4)
    assert stopped.step == 4
    resumed = run(job, tmp_path, "broken")
    assert (unbroken.step, resumed.step) == (8, 8)
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8], "resume continues at step 5"
    for a, b in zip(unbroken.history[4:], resumed.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    state = ckpt.read_state(Path(resumed.last_checkpoint))
    assert state.job is not None and state.job.name == "offline-dpo"
    weights_a, weights_b = (load_file(str(Path(o.model) / "model.safetensors")) for o in (unbroken, resumed))
    worst = max(float((weights_b[k] - v).abs().max()) for k, v in weights_a.items())
    assert worst <= 1e-5, f"weights differ after resume by up to {worst}"
    assert all(torch.isfinite(v).all() for v in weights_b.values())
