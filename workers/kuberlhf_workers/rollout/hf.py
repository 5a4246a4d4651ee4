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


class HFBackend:
    """transformers' generate with sampling; behaviour log-probs come from the processed scores."""

    def __init__(self, model_path: str | Path, device: torch.device | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or torch.device("cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
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
        torch.manual_seed(request.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=request.max_new_tokens,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **sampling,
            )
        prompt_len = input_ids.shape[1]
        generated = out.sequences[:, prompt_len:]
        scores = torch.stack(out.scores, dim=1).float()  # [B, T, V], temperature / top-p applied
        logps = scores.log_softmax(-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1).cpu()
        return self._result(request, enc["attention_mask"], input_ids, generated.cpu(), logps)

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
