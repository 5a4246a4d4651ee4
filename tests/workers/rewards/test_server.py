"""The reward server and client over real HTTP on 127.0.0.1: scores, validation, auth, limits,
metrics, retries through a flapping server, and a clear, bounded failure when nothing listens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kuberlhf_workers.rewards.client import (
    RewardClient,
    RewardServerError,
    backoff_delay,
    retry_after_seconds,
)
from kuberlhf_workers.rewards.model import RewardModelScorer, train_tiny_reward_model
from kuberlhf_workers.rewards.server import RewardService, make_app, parse_score_request, token_matches


@contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """Run an aiohttp app on a free port in a background event loop; yield its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def post(url: str, body: bytes, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_reward_model(tmp_path_factory.mktemp("rm"), tiny_model_dir, seed=0)


@pytest.fixture(scope="module")
def scorer(reward_model_dir: Path) -> RewardModelScorer:
    return RewardModelScorer(reward_model_dir)


@pytest.fixture(scope="module")
def server(scorer: RewardModelScorer) -> Iterator[str]:
    with serving(make_app(RewardService(scorer, token=None, max_batch=16), client_max_size=64 * 1024)) as url:
        yield url


PROMPTS = [f"Question {i}: " for i in range(10)]
COMPLETIONS = ["12 34", "the cat", "7 dog 8", "no", "999 999", "blue sun", "1", "a b c", "42 is 42", "yes 0"]


def test_request_validation_names_the_problem() -> None:
    assert parse_score_request({"prompts": ["a"], "completions": ["b"]}, 4) == (["a"], ["b"])
    cases = {
        "missing key 'completions'": {"prompts": []},
        "'prompts' must be a list of strings, got str": {"prompts": "a", "completions": []},
        "completions[1] must be a string, got int": {"prompts": ["a", "b"], "completions": ["x", 3]},
        "length mismatch: 2 prompts but 1 completions": {"prompts": ["a", "b"], "completions": ["x"]},
        "must be a JSON object": ["a"],
    }
    for message, body in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_score_request(body, 4)


def test_token_comparison_needs_the_exact_bearer_value() -> None:
    assert token_matches("Bearer s3cret", "s3cret")
    assert not token_matches("Bearer s3cre", "s3cret")
    assert not token_matches("s3cret", "s3cret")
    assert not token_matches(None, "s3cret")


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    import random

    rng = random.Random(0)
    delays = [backoff_delay(attempt, 0.5, rng) for attempt in range(12)]
    assert all(0 <= d <= 10.0 for d in delays) and len(set(delays)) == 12
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("9999") == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None


def test_client_scores_match_the_local_model_in_order(server: str, scorer: RewardModelScorer) -> None:
    client = RewardClient(server, batch_size=3, concurrency=3)
    remote = client(PROMPTS, COMPLETIONS)
    assert remote == pytest.approx(scorer(PROMPTS, COMPLETIONS), abs=1e-5)
    assert client([], []) == []


def test_malformed_requests_get_400_naming_the_problem(server: str) -> None:
    status, body = post(f"{server}/score", b"{not json")
    assert (status, body["error"]) == (400, "body is not valid JSON")
    status, body = post(f"{server}/score", json.dumps({"prompts": ["a"]}).encode())
    assert (status, body["error"]) == (400, "missing key 'completions'")
    status, body = post(f"{server}/score", json.dumps({"prompts": ["a", "b"], "completions": ["c"]}).encode())
    assert status == 400 and "length mismatch" in body["error"]
    status, body = post(f"{server}/score", json.dumps({"prompts": [1], "completions": ["c"]}).encode())
    assert status == 400 and "prompts[0] must be a string" in body["error"]
    with pytest.raises(RewardServerError, match=r"rejected the request: HTTP 413: batch of 17 exceeds"):
        RewardClient(server, batch_size=17)(["p"] * 17, ["c"] * 17)


def test_oversized_bodies_and_batches_get_413(server: str) -> None:
    status, body = post(
        f"{server}/score", json.dumps({"prompts": ["x" * 70_000], "completions": ["c"]}).encode()
    )
    assert status == 413 and "exceeds" in body["error"]
    status, body = post(
        f"{server}/score", json.dumps({"prompts": ["p"] * 17, "completions": ["c"] * 17}).encode()
    )
    assert status == 413 and "limit of 16" in body["error"]


def test_health_readiness_and_prometheus_metrics(server: str) -> None:
    assert get(f"{server}/healthz") == (200, "ok")
    assert get(f"{server}/readyz") == (200, "ready")
    post(f"{server}/score", json.dumps({"prompts": ["a", "b"], "completions": ["1", "2"]}).encode())
    post(f"{server}/score", b"[]")
    status, text = get(f"{server}/metrics")
    assert status == 200
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['kuberlhf_reward_requests_total{code="200"}'] >= 1
    assert samples['kuberlhf_reward_errors_total{reason="bad_request"}'] >= 1
    assert samples["kuberlhf_reward_latency_seconds_count"] >= 2
    assert samples['kuberlhf_reward_batch_size_bucket{le="4.0"}'] >= 1


def test_token_protected_server_answers_401_without_the_token(scorer: RewardModelScorer) -> None:
    service = RewardService(scorer, token="s3cret", max_batch=16)
    body = json.dumps({"prompts": ["a"], "completions": ["1"]}).encode()
    with serving(make_app(service)) as url:
        assert post(f"{url}/score", body)[0] == 401
        assert post(f"{url}/score", body, token="wrong")[0] == 401
        assert post(f"{url}/score", body, token="s3cret")[0] == 200
        assert len(RewardClient(url, token="s3cret")(["a"], ["1"])) == 1
        started = time.monotonic()
        with pytest.raises(RewardServerError, match="HTTP 401: missing or wrong bearer token"):
            RewardClient(url, max_retries=3, backoff_s=1.0)(["a"], ["1"])
        assert time.monotonic() - started < 1.0  # a 4xx is never retried
    assert service.metrics.errors.labels("unauthorized")._value.get() == 3


def test_server_not_ready_until_the_model_loads_and_scoring_never_blocks_probes() -> None:
    release = threading.Event()

    def slow_scorer(prompts: list[str], completions: list[str]) -> list[float]:
        release.wait(10)
        return [float(len(c)) for c in completions]

    service = RewardService(None, token=None, max_batch=16)
    with serving(make_app(service)) as url:
        assert get(f"{url}/readyz")[0] == 503
        status, body = post(f"{url}/score", json.dumps({"prompts": ["a"], "completions": ["b"]}).encode())
        assert (status, body["error"]) == (503, "model still loading")
        service.scorer = slow_scorer
        result: list[float] = []
        pending = threading.Thread(target=lambda: result.extend(RewardClient(url)(["a"], ["xyz"])))
        pending.start()
        time.sleep(0.2)
        assert get(f"{url}/healthz") == (200, "ok")  # answered while a batch is being scored
        release.set()
        pending.join(10)
    assert result == [3.0]


def test_client_retries_through_503_and_429_then_succeeds() -> None:
    answers = [
        web.json_response({"error": "warming up"}, status=503),
        web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "0"}),
        None,
    ]
    seen: list[float] = []

    async def flapping(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        reply = answers[len(seen) - 1]
        if reply is not None:
            return reply
        payload = await request.json()
        return web.json_response({"scores": [float(len(c)) for c in payload["completions"]]})

    app = web.Application()
    app.router.add_post("/score", flapping)
    with serving(app) as url:
        assert RewardClient(url, max_retries=3, backoff_s=0.05)(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    assert len(seen) == 3


def test_client_fails_clearly_and_fast_when_the_server_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RewardServerError) as info:
        RewardClient(url, timeout_s=2, max_retries=2, backoff_s=0.05)(["p"], ["c"])
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert (
        f"{url}/score" in message and "after 3 attempts" in message and "cannot reach the server" in message
    )


def test_cli_reward_server_serves_loopback_with_a_token_and_stops_on_sigterm(reward_model_dir: Path) -> None:
    """No --host: the server listens on 127.0.0.1 only, the default that exposes nothing to other pods."""
    port = free_port()
    env = {**os.environ, "RM_TOKEN": "tok-123"}
    command = [
        sys.executable,
        "-c",
        "from kuberlhf.cli import main; main()",
        "reward-server",
        "--model",
        str(reward_model_dir),
        "--port",
        str(port),
        "--token-env",
        "RM_TOKEN",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(f"{url}/readyz")[0] == 200:
                    break
            except urllib.error.URLError:
                pass
            time.sleep(0.3)
        assert RewardClient(url, token="tok-123")(["Q: ", "Q: "], ["1 2 3 4", "the cat"]) == pytest.approx(
            RewardModelScorer(reward_model_dir)(["Q: ", "Q: "], ["1 2 3 4", "the cat"]), abs=1e-5
        )
        assert post(f"{url}/score", json.dumps({"prompts": ["a"], "completions": ["b"]}).encode())[0] == 401
        # A token misplaced in the URL: refused, and the access log keeps the path only.
        body = json.dumps({"prompts": ["a"], "completions": ["b"]}).encode()
        assert post(f"{url}/score?token=tok-123", body)[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "tok-123" not in output and "the cat" not in output
    assert f"listening on 127.0.0.1:{port} (auth on)" in output
    assert "POST /score 401" in output, "requests are still logged, without their query"


def test_a_failing_reward_model_gives_500_and_the_client_gives_up_after_its_retries() -> None:
    calls: list[int] = []

    def short_scorer(prompts: list[str], completions: list[str]) -> list[float]:
        calls.append(len(prompts))
        return [0.0]  # one score, whatever the batch size

    service = RewardService(short_scorer, token=None, max_batch=16)
    with serving(make_app(service)) as url:
        status, body = post(
            f"{url}/score", json.dumps({"prompts": ["a", "b"], "completions": ["c", "d"]}).encode()
        )
        assert (status, body["error"]) == (500, "scoring failed (ValueError)")
        with pytest.raises(RewardServerError, match=r"after 2 attempts: HTTP 500: scoring failed"):
            RewardClient(url, max_retries=1, backoff_s=0.01)(["a", "b"], ["c", "d"])
    assert calls == [2, 2, 2]


def test_cli_reward_server_exits_1_naming_a_model_it_cannot_load(tmp_path: Path, caplog) -> None:
    from kuberlhf.cli import build_parser
    from kuberlhf_workers.rewards import server as reward_server

    missing = tmp_path / "no-such-model"
    args = build_parser().parse_args(
        ["reward-server", "--model", str(missing), "--port", str(free_port()), "--insecure"]
    )
    assert reward_server.main(args) == 1
    assert f"--model {missing}: cannot load the reward model: spec.reward.model:" in caplog.text


def test_cli_reward_server_refuses_to_start_without_a_token_unless_insecure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from kuberlhf.cli import build_parser
    from kuberlhf_workers.rewards import server as reward_server

    monkeypatch.delenv("RM_TOKEN", raising=False)
    argv = ["reward-server", "--model", str(tmp_path / "no-such-model"), "--port", str(free_port()),
            "--token-env", "RM_TOKEN"]
    assert reward_server.main(build_parser().parse_args(argv)) == 2
    assert "RM_TOKEN is not set: set it to a bearer token clients must send, or pass --insecure" \
        in caplog.text
    assert "cannot load the reward model" not in caplog.text, "it refused before listening or loading"
    caplog.clear()
    # --insecure is the explicit opt-out: the server goes on to load its model (here, and fails on it).
    assert reward_server.main(build_parser().parse_args([*argv, "--insecure"])) == 1
    assert "--insecure: /score accepts requests without a token" in caplog.text
    assert "cannot load the reward model" in caplog.text
