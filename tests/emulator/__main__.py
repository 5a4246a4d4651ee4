"""`python -m tests.emulator --port 0 --kubeconfig PATH`: serve the emulator until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path

from tests.emulator import running_emulator


def main() -> int:
    parser = argparse.ArgumentParser(description="A Kubernetes API emulator for local tries and tests.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--kubeconfig", type=Path, help="also write the admin kubeconfig here")
    parser.add_argument("--authorize", action="store_true", help="enforce RBAC for non-admin tokens")
    args = parser.parse_args()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with tempfile.TemporaryDirectory() as tmp, \
            running_emulator(Path(tmp), authorize=args.authorize, port=args.port) as handle:
        if args.kubeconfig:
            args.kubeconfig.write_text(handle.kubeconfig.read_text())
        print(handle.url, flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
