"""Trainer rank 0's end of a weight sync, run in a thread so the test's own thread can be the
rollout end: a collective sync blocks until every member is inside it, so the two ends cannot run
one after the other on one thread."""

from __future__ import annotations

import threading

import torch

from kuberlhf_workers.base.transports import ParamMeta, WeightTransport


def send_in_thread(
    sender: WeightTransport, plan: list[list[ParamMeta]], by_name: dict[str, torch.Tensor], device: str
) -> tuple[threading.Thread, list[Exception]]:
    """Start a thread that connects `sender` and sends `by_name`'s tensors (moved to `device`)
    bucket by bucket as `plan` orders them; returns the started thread and the list its error lands
    in (a thread's exception is otherwise lost: the caller joins and asserts the list is empty)."""
    errors: list[Exception] = []

    def trainer_rank0() -> None:
        try:
            if device.startswith("cuda:"):
                torch.cuda.set_device(device)  # per thread: the engine keeps cuda:0
            sender.connect()
            sender.send([[(m.name, by_name[m.name].to(device)) for m in bucket] for bucket in plan])
        except Exception as exc:  # handed to the caller, which asserts on it
            errors.append(exc)

    thread = threading.Thread(target=trainer_rank0)
    thread.start()
    return thread, errors
