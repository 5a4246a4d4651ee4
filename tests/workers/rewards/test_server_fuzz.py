"""The reward server under hostile input: hypothesis throws malformed bodies, wrong content types,
bogus methods and paths, and truncated or stalled uploads at the real server (a tiny reward
model, real HTTP on 127.0.0.1). Every answer must be a 4xx or a 2xx, never a 5xx, and come
within a bounded time; afterwards the server must still be healthy and its own metrics must
show no server error.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kuberlhf_workers.rewards.model import RewardModelScorer, train_tiny_reward_model
from kuberlhf_workers.rewards.server import RewardService, make_app

MAX_BODY = 64 * 1024
MAX_BATCH = 16
TOKEN = "fuzz-token"
ANSWER_WITHIN_S = 5.0
FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TALLY: Counter[int] = Counter()


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RewardService:
    model = train_tiny_reward_model(tmp_path_factory.mktemp("rm"), tiny_model_dir, seed=0)
    return RewardService(RewardModelScorer(model), token=TOKEN, max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def port(service: RewardService) -> Iterator[int]:
    """The real app on a free port, served from a background event loop."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(service, client_max_size=MAX_BODY))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def ask(port: int, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> int:
    """One request on a fresh connection; the status, which must come within ANSWER_WITHIN_S."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_WITHIN_S)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                             **(headers or {})})
        response = connection.getresponse()
        response.read()
        status = response.status
    finally:
        connection.close()
    assert time.monotonic() - started < ANSWER_WITHIN_S
    TALLY[status] += 1
    return status


def assert_client_error_or_success(status: int, what: object) -> None:
    assert status < 500, f"HTTP {status} for {what!r}"


def json_values() -> st.SearchStrategy[object]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


def score_shaped() -> st.SearchStrategy[object]:
    """Bodies close to valid: the right keys with wrong types, wrong lengths, extra keys, big batches."""
    awkward = st.sampled_from(["", "\ud800", "x\udfff", "\x00", "\u202e", "\ufeff"])
    strings = st.lists(st.text(max_size=30) | awkward, max_size=MAX_BATCH + 4)
    field = strings | json_values()
    return st.fixed_dictionaries({"prompts": field, "completions": field},
                                 optional={"extra": json_values()}) | st.builds(
        lambda n, m: {"prompts": ["q"] * n, "completions": ["a"] * m},
        st.integers(0, MAX_BATCH + 3), st.integers(0, MAX_BATCH + 3))


def scorable(body: object) -> bool:
    """What the server must score (200); anything else is the client's to fix (4xx)."""
    keys = ("prompts", "completions")
    if not isinstance(body, dict) or not all(isinstance(body.get(k), list) for k in keys):
        return False
    pairs = list(zip(body["prompts"], body["completions"], strict=False))
    return (len(body["prompts"]) == len(body["completions"]) <= MAX_BATCH
            and all(isinstance(p, str) and isinstance(c, str) and (p or c)
                    and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in p + c) for p, c in pairs))


@FUZZ
@given(body=st.binary(max_size=4096))
def test_random_bytes_get_a_client_error(port: int, body: bytes) -> None:
    status = ask(port, "POST", "/score", body, {"Content-Type": "application/json"})
    assert_client_error_or_success(status, body)


@FUZZ
@given(body=json_values() | score_shaped())
@example(body={"prompts": [""], "completions": [""]})  # once a 500: the model cannot score zero tokens
@example(body={"prompts": ["\ud800"], "completions": ["a"]})  # once a 500: the tokenizer refuses it
def test_json_of_any_shape_gets_an_answer_never_a_server_error(port: int, body: object) -> None:
    status = ask(port, "POST", "/score", json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert_client_error_or_success(status, body)
    assert (status == 200) == scorable(body), (status, body)


@FUZZ
@example(depth=5000, opener="[", tail=b"", utf8_breaker=b"")  # once a 500: RecursionError in json
@given(depth=st.integers(1, 20000), opener=st.sampled_from(["[", '{"a":']), tail=st.binary(max_size=8),
       utf8_breaker=st.sampled_from([b"", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
def test_deep_nesting_and_invalid_utf8_get_a_client_error(port: int, depth: int, opener: str, tail: bytes,
                                                         utf8_breaker: bytes) -> None:
    body = (opener * depth).encode()[:MAX_BODY - 16] + utf8_breaker + tail
    status = ask(port, "POST", "/score", body, {"Content-Type": "application/json"})
    assert 400 <= status < 500, (status, body[:40])


@FUZZ
@given(size=st.integers(MAX_BODY - 64, 4 * MAX_BODY), inside=st.booleans())
def test_oversized_bodies_are_refused_with_413(port: int, size: int, inside: bool) -> None:
    text = "x" * size
    body = json.dumps({"prompts": [text], "completions": ["a"]} if inside else {"blob": text}).encode()
    status = ask(port, "POST", "/score", body, {"Content-Type": "application/json"})
    assert status == 413 if len(body) > MAX_BODY else status < 500, (status, len(body))


@FUZZ
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "POST"]),
       path=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#%?"),
                    max_size=40),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/octet-stream", ""]),
       authorization=st.sampled_from([f"Bearer {TOKEN}", "", "Bearer", f"Bearer {TOKEN}x",
                                      "Basic Zm9vOmJhcg=="]))
def test_bogus_methods_paths_content_types_and_credentials(port: int, method: str, path: str,
                                                           content_type: str, authorization: str) -> None:
    body = json.dumps({"prompts": ["q"], "completions": ["a"]}).encode()
    headers = {"Content-Type": content_type, "Authorization": authorization}
    status = ask(port, method, "/" + path.lstrip("/"), body, headers)
    assert_client_error_or_success(status, (method, path, content_type, authorization))
    if path.strip("/") == "score" and method == "POST" and authorization != f"Bearer {TOKEN}":
        assert status == 401


def raw_exchange(port: int, payload: bytes, linger_s: float = 0.0) -> bytes:
    """Send raw bytes, optionally stall, close the writing side, and read what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN_S) as sock:
        sock.sendall(payload)
        time.sleep(linger_s)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_truncated_and_stalled_uploads_do_not_hurt_the_server(port: int) -> None:
    head = (f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\n")
    body = json.dumps({"prompts": ["q"], "completions": ["a"]}).encode()
    for cut in (0, 1, len(body) // 2, len(body) - 1):
        answer = raw_exchange(port, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:cut])
        assert not answer.startswith(b"HTTP/1.1 5"), answer[:80]
    for garbage in (b"POST /score HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello to a plain HTTP port
                    b"GET / HTTP/9.9\r\n\r\n", b"\r\n\r\n\r\n"):
        assert not raw_exchange(port, garbage).startswith(b"HTTP/1.1 5"), garbage
    # A client that stalls mid-body holds only its own connection: others are served meanwhile.
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN_S) as stalled:
        stalled.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + body[:5])
        for _ in range(5):
            assert ask(port, "POST", "/score", body, {"Content-Type": "application/json"}) == 200
    TALLY[0] += 10


def test_the_server_is_healthy_after_the_fuzzing_and_never_answered_5xx(port: int,
                                                                         service: RewardService) -> None:
    assert ask(port, "GET", "/healthz") == 200 and ask(port, "GET", "/readyz") == 200
    body = json.dumps({"prompts": ["q", "q"], "completions": ["1 2", "cat"]}).encode()
    assert ask(port, "POST", "/score", body, {"Content-Type": "application/json"}) == 200
    codes = {sample.labels["code"]: sample.value for metric in service.metrics.requests.collect()
             for sample in metric.samples if sample.name.endswith("_total")}
    assert not any(code.startswith("5") for code in codes), codes
    total = sum(TALLY.values())
    print(f"\nreward server fuzz: {total} inputs, answers {dict(sorted(TALLY.items()))}, 5xx: 0")
    assert total >= 1000 and not any(code >= 500 for code in TALLY)
