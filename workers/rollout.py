"""Rollout engines: the transformers (`hf`) backend, the engine factory and the Ray rollout actor.

The actor only knows the `GenerationBackend` interface, so the vLLM backend (its own module,
imported lazily) drops in without touching the driver or the weight-sync code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from kuberlhf.workers.generation import GenerationBackend, GenerationRequest, GenerationResult

from kuberlhf.api import RLHFJobSpec


class ModelRef(NamedTuple):
    """A spec's model reference and the field it came from (for error messages)."""

    ref: str
    field: str


def local_model(model: ModelRef) -> str:
    """The model as a local directory on this node (builtin models are built here, once)."""
    from kuberlhf.workers.builtin import resolve_model

    return str(resolve_model(model.ref, field=model.field))


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


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
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
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

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()


def make_backend(spec: RLHFJobSpec, model_path: str | Path, device: torch.device) -> GenerationBackend:
    """The rollout engine named by spec.rollout.engine (vLLM imported only when asked for)."""
    engine = spec.rollout.engine
    if engine == "hf":
        return HFBackend(model_path, device)
    if engine == "vllm":
        try:
            from kuberlhf.workers import vllm_backend
        except ImportError as exc:
            raise RuntimeError(
                f"spec.rollout.engine: vllm is not usable here ({exc}); install the 'cpu' or 'gpu' "
                "extra, or set rollout.engine: hf"
            ) from exc
        return vllm_backend.VLLMBackend(
            str(model_path),
            tensor_parallel_size=spec.rollout.tensor_parallel_size,
            gpu_memory_utilization=spec.rollout.gpu_memory_utilization,
            seed=spec.seed,
            max_model_len=spec.data.max_prompt_tokens + spec.data.max_new_tokens,
        )
    raise ValueError(f"spec.rollout.engine: unknown engine {engine!r}; use hf or vllm")


class RolloutWorker:
    """One rollout engine inside a Ray actor: generates, and receives weights from the trainer."""

    def __init__(self, spec: RLHFJobSpec, model: ModelRef, gpus: float, threads: int):
        if threads:
            torch.set_num_threads(threads)
        self.backend = make_backend(spec, local_model(model), pick_device(gpus))
        self.receiver: Any = None

    def ready(self) -> bool:
        return True

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.backend.generate(request)

    def rollout(self, request: GenerationRequest) -> tuple[dict[str, int], GenerationResult]:
        """`generate` plus a small summary, for two return refs: the driver fetches the summary to
        learn that the rollout is done (or that this engine died) while the result stays in the
        object store for the reward worker and the trainers."""
        from kuberlhf.workers.rollout_queue import summarize

        result = self.backend.generate(request)
        return summarize(result), result

    def join_weight_sync(self, receiver: Any) -> None:
        """Connect to the trainer's sync group (blocks until every member joined)."""
        receiver.connect()
        self.receiver = receiver

    def receive_weights(self, payload: Any = None) -> None:
        self.receiver.receive(payload, self.backend.load_weights)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.backend.named_parameters()}

    def pid(self) -> int:
        return os.getpid()
