"""What every loader worker does first: leave Ctrl-C (and SIGTERM, SIGHUP) to the main process.

A Ctrl-C in a terminal reaches the whole process group, loader workers included. A worker that dies
of it makes the main process fail with "DataLoader worker exited unexpectedly" in the middle of the
clean stop it is making; ignoring SIGINT in workers leaves the stop to the main process, which ends
the workers with the loader. A scheduler's SIGTERM and a closed terminal's SIGHUP reach every process of the
job alike and are left to the main process the same way. While it does, a worker's resource-sharing thread
(which hands tensors to the main process) may lose its connection: that is reported by nobody.
"""

from __future__ import annotations

import signal
import sys
from types import TracebackType
from typing import Optional


def ignore_interrupts(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: SIGINT, SIGTERM and SIGHUP (they reach the whole job) ignored,
    and no traceback for a connection the main process closed while it stopped (a worker's thread that hands
    tensors over then loses its peer: not an error)."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.excepthook = _quiet_when_the_main_process_left


def _quiet_when_the_main_process_left(
    kind: type[BaseException], error: BaseException, trace: Optional[TracebackType]
) -> None:
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, error, trace)
