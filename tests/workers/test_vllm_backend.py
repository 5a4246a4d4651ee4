"""The vLLM rollout backend: sampling as requested, behaviour log-probs, and weight sync that
makes vLLM generate exactly what the trainer's model would (direct and broadcast paths).

One engine per module (each LLM() start costs 10-30 s on CPU).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import torch
from kuberlhf.workers import vllm_ext
from kuberlhf.workers.generation import GenerationRequest
from kuberlhf.workers.vllm_backend import (
    check_cpu_head_size,
    fused_group,
    fused_split_sizes,
    request_seed,
    sampling_kwargs,
    split_complete,
    unfuse,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

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
    from kuberlhf.workers.vllm_backend import VLLMBackend

    return VLLMBackend(str(tiny_model_dir), seed=0, dtype="float32", max_model_len=256)


def test_each_prompt_gets_its_own_seed_and_greedy_ignores_top_p() -> None:
    assert len({request_seed(7, i) for i in range(100)}) == 100
    assert request_seed(7, 0) != request_seed(8, 0)
    greedy = sampling_kwargs(GenerationRequest(["a"], 3, 16, temperature=0.0, top_p=0.5), 0)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert greedy["n"] == 3 and greedy["max_tokens"] == 16 and greedy["logprobs"] == 0


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


def test_buckets_respect_the_size_limit_and_round_trip_bytes() -> None:
    tensors = [
        ("a", torch.arange(6, dtype=torch.float32).view(2, 3)),
        ("b", torch.arange(4, dtype=torch.int64)),
        ("c", torch.ones(10, dtype=torch.bfloat16)),
    ]
    metas = vllm_ext.metas_of(tensors)
    plan = vllm_ext.plan_buckets(metas, bucket_bytes=52)
    assert [[m.name for m in bucket] for bucket in plan] == [["a"], ["b", "c"]]
    for bucket in plan:
        by_name = dict(tensors)
        buffer = vllm_ext.pack_bucket([by_name[m.name] for m in bucket])
        for name, tensor in vllm_ext.unpack_bucket(buffer, bucket):
            assert torch.equal(tensor, by_name[name]) and tensor.dtype == by_name[name].dtype


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


def test_broadcast_sync_over_a_gloo_group_matches_the_trainer_model(engine, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = perturbed(tiny_model_dir, seed=2)
    named = [(n, p.detach().clone()) for n, p in trainer.named_parameters()]
    port, errors = free_port(), []

    def trainer_rank0() -> None:
        try:
            sender = vllm_ext.WeightBroadcaster("127.0.0.1", port, world_size=2, backend="gloo", timeout_s=60)
            sender.send(named, bucket_bytes=64 * 1024)
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    thread = threading.Thread(target=trainer_rank0)
    thread.start()
    assert engine.init_weight_sync(
        "127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo", timeout_s=60
    ) == [1]
    engine.receive_weights(vllm_ext.metas_of(named), bucket_bytes=64 * 1024)
    thread.join(timeout=60)
    assert not errors
    request = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)
    assert engine.generate(request).response_ids == [hf_greedy(trainer, tokenizer, p, 16) for p in PROMPTS]


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 NVIDIA GPUs: NCCL weight broadcast from a trainer GPU into a vLLM GPU",
)
def test_nccl_broadcast_sync_matches_the_trainer_model(tiny_model_dir: Path) -> None:
    from kuberlhf.workers.vllm_backend import VLLMBackend

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = VLLMBackend(str(tiny_model_dir), seed=0, dtype="float32", gpu_memory_utilization=0.3)
    trainer = perturbed(tiny_model_dir, seed=3).to("cuda:1")
    named = [(n, p.detach().clone()) for n, p in trainer.named_parameters()]
    port = free_port()
    thread = threading.Thread(
        target=lambda: vllm_ext.WeightBroadcaster(
            "127.0.0.1", port, world_size=2, backend="nccl", device="cuda:1"
        ).send(named, bucket_bytes=1 << 20)
    )
    thread.start()
    engine.init_weight_sync("127.0.0.1", port, rank_offset=1, world_size=2, backend="nccl", timeout_s=120)
    engine.receive_weights(vllm_ext.metas_of(named), bucket_bytes=1 << 20)
    thread.join(timeout=120)
    request = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)
    expected = [hf_greedy(trainer.cpu(), tokenizer, p, 16) for p in PROMPTS]
    assert engine.generate(request).response_ids == expected
