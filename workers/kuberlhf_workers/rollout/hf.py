"""The transformers (`hf`) rollout backend: `generate` with sampling, on CPU or one GPU.

Behaviour log-probs come from the scores generate processed (temperature and top-p applied), so
they are the log-probs of the distribution the tokens were actually drawn from.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult
from kuberlhf_workers.rollout.episodes import Turn


class HFBackend:
    """transformers' generate with sampling; behaviour log-probs come from the processed scores."""

    def __init__(
        self,
        model_path: str | Path,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        attention: str | None = None,
    ):
        """`dtype`: the compute dtype; a job's comes from spec.precision (`rollout.backend`). Unset:
        bf16 on a GPU, fp32 on a CPU, where logits then match an fp32 trainer's to ~1e-7.
        `attention`: the kernel (`base.attention.cpu_attention`); unset, transformers' default."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or torch.device("cpu")
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kernel = {} if attention is None else {"attn_implementation": attention}
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kernel)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types `.to` oddly
        self._params = dict(self.model.named_parameters())

    def generate(self, request: GenerationRequest) -> GenerationResult:
        enc = self.tokenizer(
            request.prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=request.max_prompt_tokens,
        ).to(self.device)
        n = request.samples_per_prompt
        input_ids = enc["input_ids"].repeat_interleave(n, dim=0)
        attention = enc["attention_mask"].repeat_interleave(n, dim=0)
        torch.manual_seed(request.seed)
        generated, logps = self._sample(input_ids, attention, request.max_new_tokens, request)
        return self._result(request, enc["attention_mask"], input_ids, generated, logps)

    def _sample(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        max_new_tokens: int,
        request: GenerationRequest,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids after the (left-padded) inputs and their behaviour log-probs, on the CPU."""
        greedy = request.temperature <= 0
        sampling: dict[str, Any] = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "top_k": 0,
            }
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **sampling,
            )
        generated = out.sequences[:, input_ids.shape[1] :]
        scores = torch.stack(out.scores, dim=1).float()  # [B, T, V], temperature / top-p applied
        logps = scores.log_softmax(-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1).cpu()
        return generated.cpu(), logps

    # -- token-level turns (multi-turn episodes, rollout.episodes) --------------------------------

    def encode_prompt(self, text: str, max_tokens: int) -> list[int]:
        ids: list[int] = self.tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        return ids

    def sample_turns(
        self, contexts: list[list[int]], max_new_tokens: list[int], request: GenerationRequest, seed: int
    ) -> list[Turn]:
        width = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], dtype=torch.long)
        torch.manual_seed(seed)
        generated, logps = self._sample(
            input_ids.to(self.device), attention.to(self.device), max(max_new_tokens), request
        )
        eos = self.tokenizer.eos_token_id
        turns = []
        for row, row_logps, budget in zip(generated.tolist(), logps.tolist(), max_new_tokens, strict=True):
            length = min(row.index(eos) + 1 if eos in row else len(row), budget)
            turns.append(Turn(row[:length], row_logps[:length]))
        return turns

    def _result(
        self,
        request: GenerationRequest,
        prompt_attention: torch.Tensor,
        input_ids: torch.Tensor,
        generated: torch.Tensor,
        logps: torch.Tensor,
    ) -> GenerationResult:
        eos = self.tokenizer.eos_token_id
        prompt_lengths = prompt_attention.sum(-1).repeat_interleave(request.samples_per_prompt).tolist()
        prompt_ids, response_ids, response_logps, finished = [], [], [], []
        rows = generated.tolist()
        for i, row in enumerate(rows):
            length = len(row)
            done = eos in row
            if done:
                length = row.index(eos) + 1
            prompt_ids.append(input_ids[i, input_ids.shape[1] - prompt_lengths[i] :].tolist())
            response_ids.append(row[:length])
            response_logps.append(logps[i, :length].tolist())
            finished.append(done)
        prompts = [p for p in request.prompts for _ in range(request.samples_per_prompt)]
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return GenerationResult(prompts, responses, prompt_ids, response_ids, response_logps, finished)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                raise KeyError(f"weight sync sent {name!r}, which the rollout model does not have")
            param.copy_(tensor)

    def sleep(self) -> None:
        """generate keeps no KV cache between calls: nothing to give back."""

    def wake_up(self) -> None:
        """Nothing was given back (see sleep)."""

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()
