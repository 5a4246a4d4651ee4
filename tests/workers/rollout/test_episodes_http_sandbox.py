"""examples/agent/http_sandbox.py against a real HTTP sandbox (a threaded http.server here) on the
real hf engine: answers become observations, errors and hangs fail only their own episodes."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kuberlhf.api import EnvironmentSpec
from kuberlhf_workers.base.environments import load_environment_class
from kuberlhf_workers.base.samples import GenerationRequest, summarize
from kuberlhf_workers.rollout.episodes import decode, encode_observation, run_episodes
from kuberlhf_workers.rollout.hf import HFBackend

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "agent"
MODES = ["ok", "error", "hang", "malformed"]  # how the sandbox treats each prompt's episodes
CLIENT_TIMEOUT_S = 2.0  # generous: a loaded test machine delays answers that do come
ENV_TIMEOUT_S = 10.0


class Sandbox(BaseHTTPRequestHandler):
    """Episodes keyed by the id handed out at /reset; each step of an `ok` episode is answered
    with the turn's number, rewarded 0.25."""

    episodes: ClassVar[dict[str, dict[str, Any]]] = {}
    actions: ClassVar[list[str]] = []  # what `ok` episodes were sent, in arrival order
    release = threading.Event()  # ends the hung requests when the test is done
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            if self.path == "/reset":
                episode = str(len(self.episodes))
                self.episodes[episode] = {"mode": body["record"]["mode"], "turn": 0}
                return self.reply(200, {"episode": episode, "observation": "\n"})
            state = self.episodes[body["episode"]]
            state["turn"] += 1
            if state["mode"] == "ok":
                self.actions.append(body["action"])
        mode = state["mode"]
        if mode == "error":
            return self.reply(500, "sandbox crashed")
        if mode == "hang":
            self.release.wait(30)
            return self.reply(200, {"observation": "late", "reward": 1.0, "done": True})
        if mode == "malformed":
            return self.reply(200, {"observation": "?", "reward": "high", "done": False})
        answer = f" sandbox ran turn {state['turn']}\n"
        return self.reply(200, {"observation": answer, "reward": 0.25, "done": False})

    def reply(self, status: int, payload: Any) -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the outcomes, not the access log."""


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sandbox)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        Sandbox.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(tiny_model_dir)


def test_sandbox_answers_are_observations_and_its_errors_and_hangs_fail_only_their_episodes(
    engine: HFBackend, sandbox_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SANDBOX_URL", sandbox_url)
    monkeypatch.setenv("SANDBOX_TIMEOUT_SECONDS", str(CLIENT_TIMEOUT_S))
    env_class = load_environment_class("http_sandbox.py:HttpSandbox", EXAMPLES)
    records = tuple({"prompt": f"Task {i}:", "mode": mode} for i, mode in enumerate(MODES))
    request = GenerationRequest([r["prompt"] for r in records], 2, max_new_tokens=6, seed=3, records=records)
    spec = EnvironmentSpec.model_validate(
        {"class": "http_sandbox.py:HttpSandbox", "maxTokens": 200, "timeoutSeconds": ENV_TIMEOUT_S,
         "maxFailedShare": 1.0}
    )

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kuberlhf.environment"):
        result = run_episodes(engine, env_class, spec, 2, request)
    elapsed = time.monotonic() - started

    step_url = f"{sandbox_url}/step"
    raised = "HttpSandbox.step() raised SandboxError: "
    assert result.episode_errors == [
        None,
        None,
        *[f"{raised}{step_url} answered HTTP 500: sandbox crashed"] * 2,
        *[f"{raised}{step_url}: no answer within {CLIENT_TIMEOUT_S:g}s"] * 2,
        *["HttpSandbox.step() returned reward 'high'; expected a finite number"] * 2,
    ]
    # The client gave up on the hung sandbox first, well before kuberlhf's own deadline.
    assert elapsed < ENV_TIMEOUT_S
    assert result.episode_rewards == pytest.approx([0.5, 0.5] + [0.0] * 6)
    assert result.turns == [2, 2] + [1] * 6
    assert summarize(result)["episodes_failed"] == 6
    assert "'http_sandbox.py:HttpSandbox': 6 of 8 episodes failed" in caplog.text

    assert result.loss_mask is not None
    observation = encode_observation(engine.tokenizer, " sandbox ran turn 1\n")
    turns_sent = []
    for ids, mask in zip(result.response_ids[:2], result.loss_mask[:2], strict=True):
        # model turn, the sandbox's answer (mask 0), model turn: nothing follows the last turn
        first = mask.index(0)
        second = first + len(observation)
        assert ids[first:second] == observation and mask[first:second] == [0] * len(observation)
        assert set(mask[:first]) == set(mask[second:]) == {1}
        turns_sent += [decode(engine.tokenizer, ids[:first]), decode(engine.tokenizer, ids[second:])]
    assert sorted(Sandbox.actions) == sorted(turns_sent)  # the sandbox ran exactly the model's turns
    assert all(sum(m) == 0 for m in result.loss_mask[2:])  # failed episodes are not trained on
