"""Is the Hugging Face hub reachable? Asked once per process, in 1.5 s at most (timm's pretrained weights
and transformers' models both come from it); HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are honoured."""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE say so, or when the hub did not answer within 1.5 s
    (asked once per process: then nothing asks it again, no retries, no half-minute of warnings)."""
    offline = any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in OFFLINE_VARIABLES)
    return not offline and _hub_answers()


@functools.lru_cache(maxsize=1)
def _hub_answers(timeout: float = 1.5) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answered: list[bool] = []

    def probe() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])
