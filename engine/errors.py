"""Exceptions the CLI catches, and how it prints them: one line, no traceback."""

from __future__ import annotations

import gc
import traceback
from typing import Optional


class UserError(RuntimeError):
    """Bad input: a path, a name, a value or a file that cannot be used as given."""


class CheckpointHoldsCode(UserError):
    """A checkpoint pickles Python objects (classes, functions) that weights_only loading refuses."""


class CorruptCheckpoint(UserError):
    """A checkpoint file that is truncated, not a torch file, or damaged."""


class NonFiniteLoss(UserError):
    """The training loss became NaN or inf; nothing was saved from that step."""


class RunStopped(Exception):
    """A training run ended early with its message ready (printed as it is) and its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingInterrupted(RunStopped):
    """SIGTERM/SIGINT/SIGHUP arrived; last.pt holds the state to resume from. Exit code 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message, 128 + signum)


class SaveFailed(RunStopped):
    """A checkpoint could not be written (full disk, read-only or vanished folder); the previous one is intact."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside a training loop: ends a task as Ctrl-C's KeyboardInterrupt does (every
    `except KeyboardInterrupt` treats it alike), remembering which signal it was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def first_line(err: BaseException, limit: Optional[int] = 200) -> str:
    """The first line of an upstream library's error (at most `limit` characters), to quote inside ours."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. A DataLoader worker's error arrives with the worker's whole traceback as
    its message; its last line is the original message (after 'module.Class: ')."""
    full_key = getattr(err, "full_key", None)
    if type(err).__name__ == "MissingMandatoryValue" and full_key:  # a '???' in the config
        return f"{full_key} is required: add {full_key}=VALUE to the command line"
    message = str(err).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(message.split())


def release_frames(err: BaseException) -> None:
    """Free what the frames of `err`'s traceback (and its causes') hold: a DataLoader iterator there keeps its
    workers, which ignore SIGTERM, alive, so exit would wait forever. The traceback still prints (code and lines)."""
    chain, seen = [err], set()
    while chain:
        error = chain.pop()
        if id(error) not in seen:
            seen.add(id(error))
            traceback.clear_frames(error.__traceback__)
            chain += [e for e in (error.__cause__, error.__context__) if e is not None]
    gc.collect()  # the iterator's cycles: its workers are then shut down in order
