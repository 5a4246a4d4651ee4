"""examples/pipeline run locally as a user runs it: SFT, then a reward model from the SFT model
(`job:pipeline-sft`), then GRPO from the SFT policy scored by that reward model; the final
policy scores higher under the reward model than the SFT policy did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kuberlhf.cli import build_parser

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


def kuberlhf_run(spec: Path, output: Path) -> int:
    args = build_parser().parse_args(["run", str(spec), "--output", str(output), "--quiet"])
    code: int = args.func(args)
    return code


def mean_reward(policy: Path, reward_model: Path, prompts: list[str]) -> float:
    """The reward model's mean score of the policy's sampled replies (the same seed for each policy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberlhf_workers.rewards.model import RewardModelScorer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    replies = []
    torch.manual_seed(0)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=24, do_sample=True, num_return_sequences=4,
                             pad_token_id=tokenizer.pad_token_id)
        replies += [tokenizer.decode(o[ids["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]
    scores = RewardModelScorer(reward_model)([p for p in prompts for _ in range(4)], replies)
    return sum(scores) / len(scores)


def test_the_sft_rm_grpo_chain_runs_in_order_and_raises_the_reward_models_score(
    ray_session: None, tmp_path: Path, monkeypatch: Any
) -> None:
    from transformers import AutoTokenizer

    examples = tmp_path / "examples"
    for folder in ("pipeline", "offline"):
        shutil.copytree(REPO / "examples" / folder, examples / folder)
    runs = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)

    # A later stage before the earlier one has run: refused naming the job and where it looked.
    assert kuberlhf_run(examples / "pipeline" / "2-rm.yaml", runs / "pipeline-rm") == 1
    for stage, name in (("1-sft", "pipeline-sft"), ("2-rm", "pipeline-rm"), ("3-grpo", "pipeline-grpo")):
        assert kuberlhf_run(examples / "pipeline" / f"{stage}.yaml", runs / name) == 0, stage

    rm_rows = [json.loads(line) for line in (runs / "pipeline-rm" / "metrics.jsonl").read_text().splitlines()]
    assert rm_rows[-1]["eval_accuracy"] >= 0.9
    tokenizer = AutoTokenizer.from_pretrained(runs / "pipeline-sft" / "final")
    lines = (examples / "offline" / "grpo-prompts.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    prompts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
               for r in records]  # all 256: sixteen left a 0.03 gain inside their noise
    rm = runs / "pipeline-rm" / "final"
    grpo_final = runs / "pipeline-grpo" / "final"
    before = mean_reward(runs / "pipeline-sft" / "final", rm, prompts)
    after = mean_reward(grpo_final, rm, prompts)
    print(f"\nreward-model score of sampled replies: SFT policy {before:.3f}, after GRPO {after:.3f}")
    assert after > before, (before, after)
