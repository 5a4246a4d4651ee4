"""The TRL side of bench/vs_trl.py: GRPOTrainer on the shared model, prompts and reward.

Runs in .venv-bench (TRL and kuberlhf pin different stacks). It writes one JSON line per step
to --out/trl_steps.jsonl with wall-clock timestamps taken in this process, so the parent can
measure startup and steady state the same way for both systems. Generation and reward time
are measured by timing TRL's own `_generate` and `_calculate_rewards`; the rest of a step
(log-probs, loss, backward, optimizer) is reported as "train". The trained model is saved to
--out/final, so the parent can show how far training moved the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def tensors_sha256(tensors: dict[str, Any]) -> str:
    """A digest of the tensors themselves (names, shapes, bytes), independent of the file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def load_checked_model(model_dir: Path, expected_sha256: str) -> Any:
    """Load the shared weights and prove they are the ones kuberlhf starts from."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    found = common.weights_sha256(model_dir)
    if found != expected_sha256:
        raise SystemExit(f"weights checksum mismatch: {model_dir} has {found}, expected {expected_sha256}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    file_tensors = load_file(str(model_dir / common.WEIGHTS_FILE))
    state = model.state_dict()
    if missing := sorted(file_tensors.keys() - state.keys()):
        raise SystemExit(f"the model TRL built has no tensors named {missing}")
    # A tied output projection is in the module's state but saved once, as the embedding.
    on_disk = tensors_sha256(file_tensors)
    loaded = tensors_sha256({name: state[name] for name in file_tensors})
    if loaded != on_disk:
        raise SystemExit("the model TRL loaded differs from the weights file (re-initialised tensors?)")
    return model


def make_trainer_class() -> type:
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
        """GRPOTrainer that adds up the seconds spent generating and scoring."""

        phase_seconds: dict[str, float]

        def _timed(self, phase: str, method: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - started

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            return self._timed("generate", super()._generate, *args, **kwargs)

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            return self._timed("reward", super()._calculate_rewards, *args, **kwargs)

    return TimedGRPOTrainer


def make_step_recorder(path: Path, trainer_ref: list[Any]) -> Any:
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):  # type: ignore[misc]
        """Timestamps each optimizer step and joins them with TRL's logged reward for that step."""

        def __init__(self) -> None:
            self.began = 0.0
            self.pending: dict[int, dict[str, Any]] = {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.began = time.time()
            trainer_ref[0].phase_seconds = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ended = time.time()
            phases = trainer_ref[0].phase_seconds
            generate, reward = phases.get("generate", 0.0), phases.get("reward", 0.0)
            self.pending[state.global_step] = {
                "step": state.global_step,
                "t_begin": self.began,
                "t_end": ended,
                "time_generate_s": generate,
                "time_reward_s": reward,
                "time_train_s": ended - self.began - generate - reward,
            }

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            row = self.pending.pop(state.global_step, None)
            if row is None or not logs or "reward" not in logs:
                return
            row.update(
                reward_mean=logs["reward"],
                reward_std=logs.get("reward_std"),
                response_length_mean=logs.get("completions/mean_length"),
                loss=logs.get("loss"),
            )
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    return StepRecorder()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--reward", type=Path, required=True, help="Python file defining reward()")
    parser.add_argument("--config", type=Path, required=True, help="BenchConfig as JSON")
    parser.add_argument("--expect-sha256", required=True, help="checksum of the shared weights file")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TRL's bf16=True on CPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    cfg = common.BenchConfig(**json.loads(args.config.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_checked_model(args.model, args.expect_sha256)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reward_fn = common.load_function(args.reward, "reward")
    training = GRPOConfig(
        output_dir=str(args.out / "trainer"),
        use_cpu=True,
        bf16=args.bf16,
        seed=cfg.seed,
        max_steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=cfg.samples_per_step,
        gradient_accumulation_steps=1,
        num_generations=cfg.samples_per_prompt,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        beta=cfg.beta,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer_ref: list[Any] = []
    trainer = make_trainer_class()(
        model=model,
        reward_funcs=[reward_fn],
        args=training,
        train_dataset=Dataset.from_list(common.read_prompts(args.prompts)),
        processing_class=tokenizer,
        callbacks=[make_step_recorder(args.out / "trl_steps.jsonl", trainer_ref)],
    )
    trainer_ref.append(trainer)
    trainer.train()
    trainer.save_model(str(args.out / "final"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
