"""Stopping on a signal at a safe point: a training run after the current optimizer step, on every rank at
once (`GracefulStop`); any other work at the end of a block that must not be cut (`ctrl_c_after_this`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from ..errors import Interrupted
from ..run.console import STOP_SIGNALS, raise_interrupted, say_ending, signal_name
from ..run.distributed import DistInfo, all_reduce_sum


class GracefulStop:
    """Turn SIGTERM/SIGINT/SIGHUP into a request that the loop honours after the current optimizer step.

    A second Ctrl-C (SIGINT) stops at once, with one line: last.pt then holds the state of the last save
    (checkpoints are written atomically, so it is whole). SIGHUP (a closed terminal, a dropped ssh session)
    stops as SIGTERM does, unless it is ignored (`nohup`): then the run goes on, as nohup asks."""

    # SIGUSR2: submitit's warning before a SLURM time limit (it then requeues the job)
    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR2") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for signum in self.SIGNALS:
            if signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: the user asked the run to outlive its terminal
            self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            say_ending("stopped at once by a second Ctrl-C; checkpoints/last.pt holds the last save", logging.WARNING)
            os._exit(128 + signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def pass_on(self) -> None:
        """After last.pt is safe, let a previous handler (submitit's requeue on SLURM) act too; Python's own
        Ctrl-C handler is not one (it would raise KeyboardInterrupt and print a traceback)."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous) and previous not in (signal.default_int_handler, raise_interrupted):
            previous(self.signum, None)


def stop_requested(stop: GracefulStop, device: torch.device, info: DistInfo) -> bool:
    """True on every rank as soon as any rank got a signal (so all ranks stop at the same step)."""
    if not info.enabled:
        return stop.signum is not None
    flag = torch.tensor([float(stop.signum is not None)], device=device)
    return bool(all_reduce_sum(flag, info).item() > 0)


@contextmanager
def ctrl_c_after_this(what: str) -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT), SIGTERM or SIGHUP until the block ends, then raise KeyboardInterrupt (`Interrupted`
    for the others): for work that must not be cut in the middle (tracing a model for export: an interrupt inside
    torch's tracer can crash the process). The first is answered at once with one line (the block can take
    minutes); a second stops at once. A signal that is ignored (SIGHUP under nohup) stays ignored."""
    asked: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if asked:
            say_ending(f"stopped at once by a second signal ({signal_name(signum)})", logging.WARNING)
            os._exit(128 + signum)
        asked.append(signum)
        name = signal_name(signum).split(" ")[0]  # Ctrl-C, SIGTERM, SIGHUP
        sys.stderr.write(f"\n{name}: stopping when {what} ends (a second signal stops at once)\n")
        sys.stderr.flush()

    held = [s for s in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(s) != signal.SIG_IGN]
    previous = {signum: signal.signal(signum, hold) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if asked:
        raise KeyboardInterrupt if asked[0] == signal.SIGINT else Interrupted(asked[0])
