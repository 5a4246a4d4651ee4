"""An environment behind HTTP: each model turn is sent to a sandbox, which runs it and answers
(spec.environment: {class: http_sandbox.py:HttpSandbox, timeoutSeconds: 10}).

The sandbox is any HTTP service speaking two JSON calls:

    POST {SANDBOX_URL}/reset  {"record": <the prompt record>}
        -> {"episode": "<id>", "observation": "<text before turn 1, or empty>"}
    POST {SANDBOX_URL}/step   {"episode": "<id>", "action": "<the model's turn>"}
        -> {"observation": "<text>" | null, "reward": <number>, "done": <bool>}

Its address comes from $SANDBOX_URL in the rollout workers' environment (on Kubernetes: the
worker pods' env; locally: the shell that runs `kuberlhf run`).

Failures are the sandbox's, never the model's: a refused connection, an HTTP error status, an
answer that is not JSON or a request that takes longer than the client timeout raises
`SandboxError`, and kuberlhf fails only that episode: reward 0, not trained on, left out of its
prompt group's baseline, counted in `episodes_failed` and logged by the rollout worker. A step
fails only when more than spec.environment.maxFailedShare of its episodes did.

The client timeout ($SANDBOX_TIMEOUT_SECONDS, 5 s by default) must stay below
spec.environment.timeoutSeconds: then a slow sandbox is reported as such ("no answer within 5s")
and its connection is closed, instead of the call being abandoned, still open, at kuberlhf's
deadline. A malformed answer (reward missing or not a number, done not a bool) is caught by
kuberlhf's own check of what step() returns.

Every call opens its own aiohttp session: kuberlhf awaits each `async def` call on a thread and
event loop of its own, and a session cannot outlive its loop.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 5.0


class SandboxError(RuntimeError):
    """The sandbox could not be reached, failed, or did not answer in time."""


class HttpSandbox:
    max_turns = 4

    def __init__(self, record: dict[str, Any]):
        self.record = record
        self.url = os.environ.get("SANDBOX_URL", DEFAULT_URL).rstrip("/")
        self.timeout_s = float(os.environ.get("SANDBOX_TIMEOUT_SECONDS", DEFAULT_TIMEOUT_S))
        self.episode: str | None = None

    async def reset(self) -> str:
        answer = await self._post("reset", {"record": self.record})
        self.episode = answer.get("episode")
        return str(answer.get("observation") or "")

    async def step(self, action: str) -> tuple[Any, Any, Any]:
        answer = await self._post("step", {"episode": self.episode, "action": action})
        return answer.get("observation"), answer.get("reward"), answer.get("done")

    async def _post(self, call: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.url}/{call}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=payload) as reply,
            ):
                if reply.status != 200:
                    text = (await reply.text())[:200]
                    raise SandboxError(f"{url} answered HTTP {reply.status}: {text}")
                answer = await reply.json(content_type=None)
        except TimeoutError as exc:  # aiohttp's timeout carries no message of its own
            raise SandboxError(f"{url}: no answer within {self.timeout_s:g}s") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise SandboxError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, dict):
            raise SandboxError(f"{url} answered {type(answer).__name__}, expected a JSON object")
        return answer

