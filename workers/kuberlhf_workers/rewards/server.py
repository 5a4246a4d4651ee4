"""`kuberlhf reward-server`: a reward model behind HTTP (POST /score), for jobs whose `reward.url`
points at it (a job's own reward group scores in-process and needs no server).

Safe unless told otherwise: it listens on 127.0.0.1, and it refuses to start without a bearer token
(read from `--token-env`) unless `--insecure` says an open /score is intended, because anyone who
can reach an open server can feed it inputs and read its scores. Serving other pods takes both an
explicit `--host 0.0.0.0` and a token.

Scoring runs in one worker thread behind a lock, so health probes and metrics stay responsive
while a batch is being scored, and the model never sees two batches at once. The bearer token
and request bodies are never logged: prompts can be private, and logs outlive pods.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

Scorer = Callable[[list[str], list[str]], list[float]]
MAX_BODY = web.AppKey("max_body", int)
log = logging.getLogger("kuberlhf.reward_server")


class BadRequest(ValueError):
    """Input the client must fix; the message names what is wrong."""


class TooLarge(ValueError):
    pass


def parse_score_request(body: Any, max_batch: int) -> tuple[list[str], list[str]]:
    """Validate a /score body: {"prompts": [str], "completions": [str]} of equal length."""
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object {"prompts": [...], "completions": [...]}')
    for key in ("prompts", "completions"):
        if key not in body:
            raise BadRequest(f"missing key {key!r}")
        if not isinstance(body[key], list):
            raise BadRequest(f"{key!r} must be a list of strings, got {type(body[key]).__name__}")
        bad = next((i for i, item in enumerate(body[key]) if not isinstance(item, str)), None)
        if bad is not None:
            raise BadRequest(f"{key}[{bad}] must be a string, got {type(body[key][bad]).__name__}")
    prompts, completions = body["prompts"], body["completions"]
    if len(prompts) != len(completions):
        raise BadRequest(f"length mismatch: {len(prompts)} prompts but {len(completions)} completions")
    if len(prompts) > max_batch:
        raise TooLarge(f"batch of {len(prompts)} exceeds the server's limit of {max_batch}; split it")
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        # Both reach the tokenizer, which fails on these (the model cannot score zero tokens).
        if not prompt and not completion:
            raise BadRequest(f"prompts[{i}] and completions[{i}] are both empty: nothing to score")
        if not _is_unicode(prompt) or not _is_unicode(completion):
            raise BadRequest(f"prompts[{i}] or completions[{i}] is not valid Unicode (lone surrogate)")
    return prompts, completions


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time comparison, so response timing does not reveal the token prefix by prefix."""
    expected = f"Bearer {token}".encode()
    return header is not None and hmac.compare_digest(header.encode(), expected)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    latency: Histogram
    batch_size: Histogram

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter(
                "kuberlhf_reward_requests", "Score requests, by HTTP status", ["code"], registry=registry
            ),
            Counter(
                "kuberlhf_reward_errors", "Failed score requests, by reason", ["reason"], registry=registry
            ),
            Histogram("kuberlhf_reward_latency_seconds", "Time to answer a score request", registry=registry),
            Histogram(
                "kuberlhf_reward_batch_size",
                "Completions per score request",
                buckets=(1, 4, 16, 64, 128, 256, 512, 1024),
                registry=registry,
            ),
        )


class RewardService:
    """The HTTP handlers; `scorer` is None until the model has loaded (readyz says 503 until then)."""

    def __init__(self, scorer: Scorer | None, token: str | None, max_batch: int):
        self.scorer = scorer
        self.token = token or None
        self.max_batch = max_batch
        self.metrics = Metrics.create()
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-score")

    def score_locked(self, prompts: list[str], completions: list[str]) -> list[float]:
        assert self.scorer is not None
        with self.lock:
            scores = [float(s) for s in self.scorer(prompts, completions)]
        if len(scores) != len(prompts):
            raise ValueError(f"the reward model returned {len(scores)} scores for {len(prompts)} completions")
        return scores

    def fail(self, status: int, reason: str, message: str) -> web.Response:
        self.metrics.errors.labels(reason).inc()
        self.metrics.requests.labels(str(status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response({"error": message}, status=status, headers=headers)

    async def score(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            if self.token and not token_matches(request.headers.get("Authorization"), self.token):
                return self.fail(401, "unauthorized", "missing or wrong bearer token")
            if self.scorer is None:
                self.metrics.requests.labels("503").inc()
                return web.json_response(
                    {"error": "model still loading"}, status=503, headers={"Retry-After": "2"}
                )
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge:
                return self.fail(
                    413, "too_large", f"request body exceeds {request.app[MAX_BODY]} bytes"
                )
            except ValueError:
                return self.fail(400, "bad_request", "body is not valid JSON")
            except RecursionError:
                return self.fail(400, "bad_request", "body is JSON nested too deeply")
            try:
                prompts, completions = parse_score_request(body, self.max_batch)
            except TooLarge as exc:
                return self.fail(413, "too_large", str(exc))
            except BadRequest as exc:
                return self.fail(400, "bad_request", str(exc))
            self.metrics.batch_size.observe(len(prompts))
            loop = asyncio.get_running_loop()
            try:
                scores = await loop.run_in_executor(self.executor, self.score_locked, prompts, completions)
            except Exception as exc:
                log.error("scoring failed: %s", type(exc).__name__)
                return self.fail(500, "scoring_failed", f"scoring failed ({type(exc).__name__})")
            self.metrics.requests.labels("200").inc()
            return web.json_response({"scores": scores})
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        return (
            web.Response(text="ready")
            if self.scorer is not None
            else web.Response(text="loading", status=503)
        )

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def make_app(service: RewardService, client_max_size: int = 16 * 1024 * 1024) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app[MAX_BODY] = client_max_size
    app.router.add_post("/score", service.score)
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/readyz", service.readyz)
    app.router.add_get("/metrics", service.metrics_text)
    app.on_cleanup.append(lambda _: asyncio.to_thread(service.executor.shutdown))
    return app


class AccessLog(AbstractAccessLogger):
    """Method, path, status and seconds: never the query string (a client that puts its token in the
    URL must not have it written to the pod's log) nor any header."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %d %.3fs", request.method, request.path, response.status, time)


async def serve(args: argparse.Namespace, token: str | None) -> None:
    """Listen first, then load the model: liveness passes at once, readiness once scoring works."""
    from kuberlhf_workers.base.builtin import resolve_model
    from kuberlhf_workers.rewards.model import RewardModelScorer

    def load() -> RewardModelScorer:
        path = resolve_model(args.model, field="spec.reward.model")
        return RewardModelScorer(path, args.device, precision=args.precision)

    service = RewardService(None, token, args.max_batch)
    runner = web.AppRunner(make_app(service, args.max_body_mb * 1024 * 1024), access_log_class=AccessLog)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("listening on %s:%d (auth %s)", args.host, args.port, "on" if token else "off")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        try:
            service.scorer = await asyncio.to_thread(load)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"--model {args.model}: cannot load the reward model: {exc}") from exc
        log.info("model loaded from %s; ready", args.model)
        await stop.wait()
    finally:
        await runner.cleanup()


def missing_token(token: str | None, insecure: bool, token_env: str) -> str | None:
    """Why the server must not start (None: it may): no token and no explicit `--insecure`."""
    if token is not None or insecure:
        return None
    return (f"{token_env} is not set: set it to a bearer token clients must send, or pass --insecure "
            "to serve /score to anyone who can reach it")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(args.token_env) or None
    refusal = missing_token(token, args.insecure, args.token_env)
    if refusal is not None:
        log.error("%s", refusal)
        return 2
    if token is None:
        log.warning("--insecure: /score accepts requests without a token")
    try:
        asyncio.run(serve(args, token))
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.host, args.port, exc)
        return 1
    return 0
