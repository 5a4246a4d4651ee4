"""What a user watching `kubectl get rlhfjobs` saw, polled with the real kubectl, deduplicated."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def parse_table(text: str) -> list[dict[str, str]]:
    """kubectl's aligned table as rows keyed by header; a blank cell reads as ''."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def without_age(line: str) -> str:
    """The line minus its last column (AGE grows every second; it is not a change)."""
    return line.rsplit(None, 1)[0] if line.split() else line


@dataclass
class Transcript:
    """Polls `get` (a function returning kubectl's table text) until stopped; keeps changed lines."""

    get: Callable[[], str]
    every_s: float = 1.0
    header: str = ""
    lines: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    _seen: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def poll(self) -> None:
        text = self.get()
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return
        self.header = self.header or lines[0]
        for line, row in zip(lines[1:], parse_table(text), strict=True):
            if self._seen.get(row["NAME"]) != without_age(line):
                self._seen[row["NAME"]] = without_age(line)
                self.lines.append(line)
                self.rows.append(row)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll()
            except Exception as exc:  # one failed poll (a timeout on a loaded machine) is not fatal
                self.lines.append(f"# poll failed: {exc}")
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def __enter__(self) -> Transcript:
        self._thread = threading.Thread(target=self._loop, name="transcript", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def text(self) -> str:
        return "\n".join([self.header, *self.lines]) + "\n"
