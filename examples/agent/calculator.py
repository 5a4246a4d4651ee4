"""A calculator tool for multi-turn RL (spec.environment: calculator.py:Calculator).

The model is asked a product. In any turn it may call the tool by writing `CALC: 12*7`; the
environment answers `= 84` and the episode goes on. A turn without a call is the model's answer:
the episode ends and scores 1 if its last number is right. A turn with no number and no call gets a
nudge and another turn.

Shaping, so that the randomly initialised builtin:tiny learns in minutes on a CPU (it cannot yet
write `CALC:` or the right product): an answer scores 0.5 times the share of its characters that
are digits when wrong, and a well-formed tool call earns 0.2. A real model needs none of it: set
the shaping weights to 0.

An HTTP sandbox plugs in the same way (http_sandbox.py): `step` is `async def`, calls the sandbox
with a client timeout below spec.environment.timeoutSeconds and returns the observation it sends
back. A call that raises or runs past the timeout fails only its episode (reward 0, counted in the
metrics and logged).
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

DIGIT_SHAPING = 0.5
TOOL_SHAPING = 0.2
_CALL = re.compile(r"CALC:\s*([0-9+\-*/(). ]+)")
_NUMBER = re.compile(r"-?\d+")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> float:
    """Arithmetic only (+ - * / and parentheses): never eval() text a model wrote."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](walk(node.left), walk(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"not arithmetic: {expression!r}")

    return walk(ast.parse(expression.strip(), mode="eval").body)


class Calculator:
    max_turns = 3

    def __init__(self, record: dict[str, Any]):
        self.answer = str(record["answer"])

    def reset(self) -> str:
        return "\n"

    def step(self, action: str) -> tuple[str | None, float, bool]:
        call = _CALL.search(action)
        if call:
            try:
                value = evaluate(call.group(1))
            except (ValueError, SyntaxError, ZeroDivisionError):
                return " = error\n", 0.0, False
            return f" = {value:g}\n", TOOL_SHAPING, False
        numbers = _NUMBER.findall(action)
        if not numbers:
            return " Answer with a number, or CALC: 12*7 to compute.\n", 0.0, False
        if numbers[-1] == self.answer:
            return None, 1.0, True
        text = action.strip()
        return None, DIGIT_SHAPING * sum(c.isdigit() for c in text) / max(len(text), 1), True
