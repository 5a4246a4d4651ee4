"""Padding-free training layouts: the pad layout's log-probs, loss and gradients, with fewer pads.

A real tiny Llama (builtin:tiny) on the CPU, no DeepSpeed and no Ray: the layouts only change how a
micro-batch goes through the model, so a plain module shows everything they can get wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.attention import CPU_EAGER_MAX_TOKENS
from kuberlhf_workers.base.samples import GenerationResult
from kuberlhf_workers.training import padding
from kuberlhf_workers.training.batch import Batch, collate, response_logprobs, token_logprobs
from kuberlhf_workers.training.experience import Experience, make_experience
from kuberlhf_workers.training.forward import forward_logits
from kuberlhf_workers.training.objectives import PolicyObjective, ValueObjective

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
# Every layout the trainers can run, bucket at several sizes (1: a row per forward; 3: a ragged last bucket).
LAYOUTS: list[tuple[padding.Layout, int]] = [
    ("pad", 8), ("bucket", 1), ("bucket", 3), ("bucket", 8), ("pack", 8), ("varlen", 8)
]
IDS = [f"{name}-r{rows}" if name == "bucket" else name for name, rows in LAYOUTS]


def _rollout(prompt_lens: list[int], response_lens: list[int], seed: int = 0, episode: bool = False) -> Batch:
    """Random prompts and responses of the given lengths; `episode`: every third response token is an
    observation (loss mask 0), as a multi-turn environment writes them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in response_lens]
    logps = [(-5.0 + 0.1 * torch.randn(n, generator=g)).tolist() for n in response_lens]
    masks = [[0 if t % 3 == 2 else 1 for t in range(n)] for n in response_lens] if episode else None
    rows = len(prompt_lens)
    finished = [True] * rows
    result = GenerationResult([""] * rows, [""] * rows, prompts, responses, logps, finished, loss_mask=masks)
    return collate(result, pad_id=0)


# Lengths 7, 8, 10, 11, 5, 6, 4, 2: packed into rows of 11, three rows hold two sequences each, and
# one row has no response token at all.
PROMPTS, RESPONSES = [3, 7, 1, 5, 2, 6, 2, 1], [4, 1, 9, 6, 3, 0, 2, 1]
ALL = slice(0, len(PROMPTS))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(tiny_model_dir: Path, request: pytest.FixtureRequest) -> torch.nn.Module:
    """The tiny Llama with each attention kernel a CPU trainer loads (`padding.training_attention`):
    both must read packed rows' restarting position ids as sequence boundaries."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    loaded: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    ).eval()
    return loaded


def _spec(**extra: object) -> RLHFJobSpec:
    base: dict[str, object] = {
        "model": {"actor": "builtin:tiny"}, "reward": {"function": "m:f"},
        "rollout": {"samplesPerPrompt": 2, "temperature": 0.7}, "data": {"maxNewTokens": 9},
    }
    return RLHFJobSpec.model_validate(base | extra)


def _experience(spec: RLHFJobSpec, batch: Batch, values: torch.Tensor | None = None) -> Experience:
    rewards = torch.linspace(-1.0, 1.0, len(batch))
    ref = batch.behaviour_logp - 0.05
    return make_experience(spec, batch, rewards, ref, values)


def _objective(cls: type, spec: RLHFJobSpec, layout: padding.Layout, rows: int) -> Any:
    objective = cls(spec)
    objective.layout, objective.bucket_rows = layout, rows
    return objective


@pytest.mark.parametrize(("layout", "rows"), LAYOUTS, ids=IDS)
def test_every_layout_gives_the_padded_batchs_token_logprobs(model: torch.nn.Module, layout, rows) -> None:
    batch = _rollout(PROMPTS, RESPONSES)
    with torch.no_grad():
        expected = token_logprobs(forward_logits(model, batch), batch, 0.7)
        got = response_logprobs(padding.response_outputs(model, batch, layout, bucket_rows=rows), batch, 0.7)
    real = batch.attention_mask[:, batch.prompt_len :].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=2e-5)
    assert got.shape == expected.shape


@pytest.mark.parametrize(("layout", "rows"), LAYOUTS[1:], ids=IDS[1:])
def test_every_layout_gives_the_pad_layouts_policy_loss_and_gradients(
    model: torch.nn.Module, layout, rows
) -> None:
    """The whole actor loss (clipped surrogate, KL loss, entropy bonus), on an episode's loss mask."""
    spec = _spec(kl={"coef": 0.1, "mode": "loss"}, loss={"entropyCoef": 0.01})
    exp = _experience(spec, _rollout(PROMPTS, RESPONSES, episode=True))
    results = []
    for name, size in [("pad", 8), (layout, rows)]:
        model.zero_grad()
        loss, metrics = _objective(PolicyObjective, spec, name, size).loss(model, exp, ALL, CPU)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), metrics, grads))
    (pad_loss, pad_metrics, pad_grads), (loss, metrics, grads) = results
    assert loss == pytest.approx(pad_loss, rel=1e-5, abs=1e-6)
    assert metrics["entropy"] == pytest.approx(pad_metrics["entropy"], rel=1e-5)
    assert grads.keys() == pad_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, pad_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("layout", "rows"), LAYOUTS[1:], ids=IDS[1:])
def test_every_layout_gives_the_pad_layouts_critic_values_and_value_loss_gradients(
    tiny_model_dir: Path, layout, rows
) -> None:
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    critic = AutoModelForTokenClassification.from_pretrained(
        tiny_model_dir, num_labels=1, dtype=torch.float32
    )
    spec = _spec(algorithm="ppo", model={"actor": "builtin:tiny", "critic": "builtin:tiny"})
    batch = _rollout(PROMPTS, RESPONSES, seed=1)
    mask = batch.response_mask.bool()
    results = []
    for name, size in [("pad", 8), (layout, rows)]:
        objective = _objective(ValueObjective, spec, name, size)
        with torch.no_grad():
            values = objective.values(critic, batch) * batch.response_mask
        exp = _experience(spec, batch, values=torch.zeros_like(values))
        critic.zero_grad()
        loss, _ = objective.loss(critic, exp, ALL, CPU)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}
        results.append((values, float(loss.detach()), grads))
    (pad_values, pad_loss, pad_grads), (values, loss, grads) = results
    torch.testing.assert_close(values[mask], pad_values[mask], rtol=0, atol=2e-5)
    assert loss == pytest.approx(pad_loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, pad_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_rows_in_bf16_give_the_pad_layouts_logprobs_and_gradients_up_to_bf16_rounding(
    tiny_model_dir: Path, lora: bool
) -> None:
    """The bf16 model DeepSpeed's bf16 mode trains (LoRA adapters on every linear layer and the head,
    B moved off zero as after some updates): packed rows differ from padded ones by about what bf16
    rounding alone moves padded rows from fp32 (measured here, LoRA: 4.4e-3 against 5.3e-3 max
    log-prob difference, gradient cosine pack/pad 0.99999), and no more from fp32 than padded rows.
    Sequences attending across a packed row's boundaries fail every bound."""
    from transformers import AutoModelForCausalLM

    from kuberlhf.api import LoraSpec
    from kuberlhf_workers.training.lora import apply_lora

    torch.manual_seed(0)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if lora:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        model = apply_lora(model, LoraSpec(rank=8, alpha=32, target_modules=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    batch = _rollout(PROMPTS, RESPONSES)
    real = batch.response_mask.bool()
    advantages = torch.linspace(-1.0, 1.0, len(batch)).unsqueeze(1).expand_as(batch.response_mask)
    results: dict[tuple[torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        for layout in ("pad", "pack"):
            model.zero_grad()
            logp = response_logprobs(padding.response_outputs(model, batch, layout), batch, 0.7)
            (-(logp * advantages)[real].mean()).backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            results[(dtype, layout)] = (logp.detach()[real], grads)
    exact_logp, exact_grad = results[(torch.float32, "pad")]
    pad_logp, pad_grad = results[(torch.bfloat16, "pad")]
    pack_logp, pack_grad = results[(torch.bfloat16, "pack")]
    rounding = float((pad_logp - exact_logp).abs().max())
    assert 0 < float((pack_logp - pad_logp).abs().max()) <= 1.5 * rounding  # 0: not bf16 at all
    assert float((pack_logp - exact_logp).abs().max()) <= 1.5 * rounding
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(pack_grad, pad_grad, dim=0)) > 0.9999
    assert float(cosine(pack_grad, exact_grad, dim=0)) >= float(cosine(pad_grad, exact_grad, dim=0)) - 5e-5
    assert float(pack_grad.norm() / pad_grad.norm()) == pytest.approx(1.0, abs=1e-3)


def test_position_ids_restart_at_every_sequence_of_a_packed_row() -> None:
    batch = _rollout([2, 1, 3], [2, 3, 0])  # sequences of 4, 4 and 3 tokens
    (piece,) = padding.pack_pieces(batch, capacity=8)
    assert piece.input_ids.shape == (2, 8)
    # the second row's padding continues its sequence: behind every real token, causal attention hides it
    assert piece.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]]
    (varlen,) = padding.pieces(batch, "varlen")
    assert varlen.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]  # one row, no pad at all
    assert varlen.attention_mask is None


def test_packed_rows_that_hold_one_sequence_each_need_no_attention_mask() -> None:
    from transformers.masking_utils import find_packed_sequence_indices

    alone = padding.pack_pieces(_rollout([2, 3, 1], [6, 2, 4]))[0]  # 8, 5, 5 tokens: rows of 8 hold one each
    assert alone.input_ids.shape == (3, 8)
    assert find_packed_sequence_indices(alone.position_ids) is None  # SDPA's plain causal kernel
    shared = padding.pack_pieces(_rollout([2, 1, 1], [6, 2, 3]))[0]  # 8, 3, 4: the 3 and the 4 share a row
    assert find_packed_sequence_indices(shared.position_ids) is not None


@pytest.mark.parametrize("layout", ["bucket", "pack", "varlen"])
def test_no_token_attends_to_another_sequence_or_to_padding(model: torch.nn.Module, layout) -> None:
    """Changing every token of one sequence changes no other row's outputs (in bucket and pack layouts
    sequences share a forward, in pack and varlen a row)."""
    batch = _rollout(PROMPTS, RESPONSES)
    other = _rollout(PROMPTS, RESPONSES, seed=5)
    changed = Batch(batch.input_ids.clone(), batch.attention_mask, batch.position_ids, batch.response_mask,
                    batch.behaviour_logp, batch.prompt_len)
    changed.input_ids[0] = other.input_ids[0]  # row 0 shares a packed row with row 6
    with torch.no_grad():
        before = padding.response_outputs(model, batch, layout, bucket_rows=3)
        after = padding.response_outputs(model, changed, layout, bucket_rows=3)
    keep = [1, 2, 3, 4, 5, 6, 7]
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-5)
    assert not torch.allclose(after[0], before[0])


def test_buckets_hold_rows_of_similar_length_each_padded_only_to_its_own_longest() -> None:
    batch = _rollout([3, 1, 2, 6, 1], [1, 1, 9, 9, 2])  # 4, 2, 11, 15, 3 tokens
    pieces = padding.bucket_pieces(batch, bucket_rows=2)
    assert [tuple(p.input_ids.shape) for p in pieces] == [(2, 3), (2, 11), (1, 15)]
    assert all(p.attention_mask is None for p in pieces)  # right padding: plain causal attention
    total = sum(p.input_ids.numel() for p in pieces)
    assert total < batch.input_ids.numel() and total == 3 + 3 + 11 + 11 + 15


def test_only_the_positions_that_predict_response_tokens_compute_logits() -> None:
    batch = _rollout(PROMPTS, RESPONSES)
    responses = sum(RESPONSES)
    (varlen,) = padding.pieces(batch, "varlen")
    assert len(varlen.keep) == len(varlen.src) == len(varlen.dst) == responses
    for layout in ["bucket", "pack"]:
        assert sum(len(p.dst) for p in padding.pieces(batch, layout)) == responses
    (pad,) = padding.pieces(batch, "pad")
    assert len(pad.keep) == batch.response_mask.shape[1]  # not the prompt columns


def test_an_episodes_observations_are_attended_in_every_layout_but_stay_out_of_the_loss(
    model: torch.nn.Module
) -> None:
    spec = _spec()
    batch = _rollout(PROMPTS, RESPONSES, episode=True)
    observation = (batch.response_mask == 0) & batch.attention_mask[:, batch.prompt_len :].bool()
    assert observation.any()
    exp = _experience(spec, batch)
    poked = _experience(spec, batch)
    poked.advantages = exp.advantages + 10.0 * observation  # what the loss mask must hide
    for layout in ["bucket", "pack", "varlen"]:
        tokens = torch.cat([p.input_ids.flatten() for p in padding.pieces(batch, layout)])
        for row, col in observation.nonzero().tolist():
            assert int(batch.input_ids[row, batch.prompt_len + col]) in tokens.tolist()
        objective = _objective(PolicyObjective, spec, layout, 8)
        with torch.no_grad():
            plain, _ = objective.loss(model, exp, ALL, CPU)
            hidden, _ = objective.loss(model, poked, ALL, CPU)
        assert float(hidden) == pytest.approx(float(plain), abs=1e-7)
        assert torch.equal(exp.batch.rows(ALL).response_mask, batch.response_mask)


def test_auto_is_packed_rows_under_a_block_diagonal_mask_on_a_cpu() -> None:
    assert padding.resolve("auto", CPU, torch.float32) == "pack"
    assert padding.resolve("auto", CPU, torch.bfloat16) == "pack"
    assert padding.resolve("bucket", CPU, torch.float32) == "bucket"
    assert padding.resolve("pack", CPU, torch.bfloat16) == "pack"
    assert padding.resolve("pad", CPU, torch.float32) == "pad"
    # flash-attention runs neither fp32 nor without the flash_attn package
    assert padding.resolve("auto", torch.device("cuda"), torch.float32) == "pack"
    assert padding.attention_implementation("varlen") == "flash_attention_2"
    assert padding.attention_implementation("bucket") is None


def test_cpu_trainers_load_eager_attention_for_short_sequences_and_sdpa_past_them() -> None:
    short, limit = 288, CPU_EAGER_MAX_TOKENS
    assert padding.training_attention("pack", CPU, short) == "eager"
    assert padding.training_attention("pad", CPU, limit) == "eager"
    assert padding.training_attention("pack", CPU, limit + 1) is None
    assert padding.training_attention("pack", torch.device("cuda"), short) is None
    assert padding.training_attention("varlen", torch.device("cuda"), short) == "flash_attention_2"
    # The spec's longest sequence decides: prompt + completion, or + a whole episode.
    assert PolicyObjective(_spec(data={"maxNewTokens": 32})).attention == {"attn_implementation": "eager"}
    assert PolicyObjective(_spec(data={"maxPromptTokens": 1024, "maxNewTokens": 32})).attention == {}


def test_the_trainers_padding_is_a_spec_field_with_auto_by_default() -> None:
    spec = _spec(actor={"padding": "pack"})
    assert spec.actor.padding == "pack" and _spec().actor.padding == "auto"
    assert PolicyObjective(_spec(actor={"padding": "pad"})).layout == "pad"
    with pytest.raises(ValueError, match="padding"):
        _spec(actor={"padding": "ragged"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention needs a CUDA GPU (none here)")
def test_varlen_flash_attention_gives_the_padded_batchs_logprobs_on_a_gpu(tiny_model_dir: Path) -> None:
    pytest.importorskip("flash_attn", reason="varlen attention needs the flash_attn package")
    from transformers import AutoModelForCausalLM

    cuda = torch.device("cuda")
    padded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).to(cuda).eval()
    flash = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2"
    ).to(cuda).eval()
    batch = _rollout(PROMPTS, RESPONSES)
    with torch.no_grad():
        expected = token_logprobs(forward_logits(padded, batch), batch, 1.0)
        got = response_logprobs(padding.response_outputs(flash, batch, "varlen"), batch, 1.0)
    real = batch.attention_mask[:, batch.prompt_len :].bool().to(cuda)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=5e-2)  # bf16 kernels
