"""Stopping a training run on a signal: after the current optimizer step, on every rank at once."""

from __future__ import annotations

import signal
from typing import Any, Optional

import torch

from ..run.distributed import DistInfo, all_reduce_sum


class GracefulStop:
    """Turn SIGTERM/SIGINT into a request that the loop honours after the current optimizer step."""

    # SIGUSR2: submitit's warning before a SLURM time limit (it then requeues the job)
    SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ())

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def pass_on(self) -> None:
        """After last.pt is safe, let a previous handler (submitit's requeue on SLURM) act too."""
        previous = self._previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)


def stop_requested(stop: GracefulStop, device: torch.device, info: DistInfo) -> bool:
    """True on every rank as soon as any rank got a signal (so all ranks stop at the same step)."""
    if not info.enabled:
        return stop.signum is not None
    flag = torch.tensor([float(stop.signum is not None)], device=device)
    return bool(all_reduce_sum(flag, info).item() > 0)
