"""A run outlives its console, stops cleanly on a signal, and its folder says how it ended.

`| tee` dies first on Ctrl-C (the terminal signals the whole foreground group), a closed terminal or dropped ssh
session leaves a tty that answers EIO, a SLURM job's output file can vanish: a failed write to the console must not
end the run before it saves (`survive_closed_console`). The ending line goes where the user looks and to main.log."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from contextlib import contextmanager, suppress
from typing import Any, Callable, Iterable, Iterator, TextIO

from ..errors import Interrupted

READER_GONE = {errno.EPIPE, errno.EIO, errno.ENXIO}  # a closed pipe, a hung-up or vanished terminal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # POSIX, as the run folder's lock (fcntl) is


class _SurvivingStream:
    """A text stream whose writes and flushes never raise because the reader went away: then its descriptor is
    pointed at /dev/null, so that later writes (tqdm, logging, C code, the flush at exit) succeed silently."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        self._unless_gone(self._stream.write, text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._unless_gone(self._stream.flush)

    def _unless_gone(self, call: Callable[..., Any], *args: Any) -> None:
        if self.gone:
            return
        try:
            call(*args)
        except (OSError, ValueError) as err:
            closed = type(err) is ValueError and "closed file" in str(err)  # not a character the encoding lacks
            if not closed and not (isinstance(err, OSError) and err.errno in READER_GONE):
                raise
            self.gone = True
            with suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self._stream, name)


def survive_closed_console() -> None:
    """Wrap sys.stdout and sys.stderr once, before logging and progress bars take them (None, from `>&-`, stays)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SurvivingStream):
            setattr(sys, name, _SurvivingStream(stream))


def stop_signals_interrupt() -> None:
    """SIGTERM (a scheduler, `kill`) and SIGHUP (a closed terminal) raise `Interrupted` from now on, as Ctrl-C
    does, so a task releases what it holds: not where something else handles them (a SIGHUP that `nohup`
    ignores, submitit's handler in a SLURM job, a training loop's `GracefulStop`)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, raise_interrupted)


def raise_interrupted(signum: int, frame: Any) -> None:
    """The handler `stop_signals_interrupt` installs: the task unwinds, and a second signal meanwhile ends it."""
    exit_on_another_signal()
    raise Interrupted(signum)


def exit_on_another_signal() -> None:
    """While a stop is handled (loaders closing, files released): another Ctrl-C, SIGTERM or SIGHUP ends the
    process at once, with one line (a process blocked in a C call, such as a collective waiting on a dead rank,
    runs no Python handler until it returns: there only SIGKILL ends it)."""
    _handle_stop_signals(_exit_at_once)


def _handle_stop_signals(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """`handler` for Ctrl-C, SIGTERM and SIGHUP, but for one that is ignored (SIGHUP under nohup stays ignored)."""
    held = [s for s in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(s) != signal.SIG_IGN]
    return {signum: signal.signal(signum, handler) for signum in held}


def _exit_at_once(signum: int, frame: Any) -> None:
    say_ending(f"stopped at once by a second signal ({signal_name(signum)})", logging.WARNING)
    os._exit(128 + signum)


@contextmanager
def ctrl_c_after_this(what: str) -> Iterator[None]:
    """Hold a Ctrl-C, SIGTERM or SIGHUP until the block ends, then raise KeyboardInterrupt (`Interrupted` for the
    others): for work that must not be cut (an interrupt inside torch's tracer can crash the process). The first
    is answered at once with one line (the block can take minutes); a second stops at once."""
    asked: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if asked:
            _exit_at_once(signum, frame)
        asked.append(signum)
        name = signal_name(signum).split(" ")[0]  # Ctrl-C, SIGTERM, SIGHUP
        sys.stderr.write(f"\n{name}: stopping when {what} ends (a second signal stops at once)\n")
        sys.stderr.flush()

    previous = _handle_stop_signals(hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if asked:
        raise KeyboardInterrupt if asked[0] == signal.SIGINT else Interrupted(asked[0])


def signal_name(signum: int) -> str:
    """How the ending line names a signal: Ctrl-C (SIGINT), SIGTERM, SIGHUP."""
    name = signal.Signals(signum).name
    return f"Ctrl-C ({name})" if signum == signal.SIGINT else name


def log_ending(message: str, level: int = logging.ERROR) -> None:
    """Append the run's ending (stopped, refused, crashed) to main.log in its format, written directly so that a
    full disk cannot turn it into a logging traceback, and not printed again (the console has it already)."""
    record = logging.getLogger("main").makeRecord("main", level, __file__, 0, message.rstrip("\n"), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            with suppress(OSError, ValueError):  # a full or vanished disk: the console line is all there is
                handler.stream.write(handler.format(record) + "\n")
                handler.stream.flush()


def say_ending(message: str, level: int = logging.ERROR) -> None:
    """Print the run's ending line on standard error; where its reader is gone, on standard output; where that is
    gone too (Ctrl-C through `| tee`: the terminal would show only `^C`), on the terminal if this process is in its
    foreground there (a background job writing there could be stopped by SIGTTOU). Then to main.log."""
    for stream in (sys.stderr, sys.stdout):  # None: closed at start; a `_SurvivingStream` finds out by this write
        if stream is not None and not getattr(stream, "gone", False):
            print(message, file=stream, flush=True)
            if not getattr(stream, "gone", False):
                break
    else:  # neither reached
        with suppress(OSError):  # no controlling terminal (ENXIO: a batch job, a daemon), or it hung up too
            with open("/dev/tty", "w") as tty:
                if os.tcgetpgrp(tty.fileno()) == os.getpgrp():
                    tty.write(message.rstrip("\n") + "\n")
    log_ending(message, level)
