"""A run outlives its console, and its folder says how it ended.

`survive_closed_console`: `python main.py ... | tee run.log` and Ctrl-C kill tee first (the terminal signals
the whole foreground group), a closed terminal or a dropped ssh session leaves a tty that answers EIO, and a
SLURM job's output file can vanish. A failed write to stdout or stderr then must not end the run before it
saves: the streams are wrapped so that such a write is dropped, and the file descriptor is pointed at
/dev/null so that later writes (tqdm, logging, C code, the interpreter's flush at exit) succeed silently.

`stop_signals_interrupt`: SIGTERM (a scheduler, `kill`) and SIGHUP (a closed terminal) end any task as Ctrl-C
does: an `Interrupted` exception where the task is, so it releases what it holds and keeps nothing half-written.

`log_ending`: the line that says how a run ended (stopped, refused, crashed) goes to main.log too, written
directly so that a full disk cannot turn it into a logging traceback. `say_ending`: a run's stop line where the
user looks: standard error, or the controlling terminal once standard output and error are gone (Ctrl-C through
`| tee` kills tee, and the terminal would show only `^C`), and main.log always.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from typing import Any, Callable, Iterable, TextIO

from ..errors import Interrupted

READER_GONE = {errno.EPIPE, errno.EIO, errno.ENXIO}  # a closed pipe, a hung-up or vanished terminal


def _reader_gone(err: Exception) -> bool:
    """True for the errors of a console that went away (not, say, a character the encoding lacks)."""
    if isinstance(err, OSError):
        return err.errno in READER_GONE
    return type(err) is ValueError and "closed file" in str(err)


class _SurvivingStream:
    """A text stream whose writes and flushes never raise because the reader went away."""

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
        """`call(*args)` on the real stream while its reader is there; once it is gone, nothing."""
        if self.gone:
            return
        try:
            call(*args)
        except (OSError, ValueError) as err:
            if not _reader_gone(err):
                raise
            self._go_quiet()

    def _go_quiet(self) -> None:
        """Point the descriptor at /dev/null: what is still buffered, and every later write, goes nowhere."""
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self._stream, name)


def survive_closed_console() -> None:
    """Wrap sys.stdout and sys.stderr (once, before logging and progress bars take them); a stream that is
    None (started with `>&-`) stays None, as Python has it."""
    if sys.stdout is not None and not isinstance(sys.stdout, _SurvivingStream):
        sys.stdout = _SurvivingStream(sys.stdout)  # type: ignore[assignment]
    if sys.stderr is not None and not isinstance(sys.stderr, _SurvivingStream):
        sys.stderr = _SurvivingStream(sys.stderr)  # type: ignore[assignment]


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def raise_interrupted(signum: int, frame: Any) -> None:
    """The handler `stop_signals_interrupt` installs: the task unwinds, and a second signal meanwhile ends it."""
    exit_on_another_signal()
    raise Interrupted(signum)


def exit_on_another_signal() -> None:
    """While a stop is handled (loaders closing, files released): another Ctrl-C, SIGTERM or SIGHUP ends the
    process at once, with one line. (A process blocked inside a C call, such as a collective waiting on a dead
    rank, runs no Python handler until the call returns: there only SIGKILL ends it.)"""
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, _exit_at_once)


def _exit_at_once(signum: int, frame: Any) -> None:
    say_ending(f"stopped at once by a second signal ({signal_name(signum)})", logging.WARNING)
    os._exit(128 + signum)


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP raise `Interrupted` from now on, where nothing else handles them: not a SIGHUP that
    `nohup` ignores (the run outlives its terminal, as asked), not a handler a launcher installed (submitit's
    in a SLURM job). A training loop handles all of them itself (engine.training.stop.GracefulStop)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, raise_interrupted)


def signal_name(signum: int) -> str:
    """How the ending line names a signal: Ctrl-C (SIGINT), SIGTERM, SIGHUP."""
    name = signal.Signals(signum).name
    return f"Ctrl-C ({name})" if signum == signal.SIGINT else name


def log_ending(message: str, level: int = logging.ERROR) -> None:
    """Append `message` (the run's ending: stopped, refused, crashed) to main.log, the files the root logger
    writes to, in their format, without printing it again on the console (it was printed there already)."""
    record = logging.getLogger("main").makeRecord("main", level, __file__, 0, message.rstrip("\n"), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            try:
                handler.stream.write(handler.format(record) + "\n")
                handler.stream.flush()
            except (OSError, ValueError):  # a full or vanished disk: the console line is all there is
                pass


def say_ending(message: str, level: int = logging.ERROR) -> None:
    """Print the run's ending line on standard error; where its reader is gone, on standard output; where that is
    gone too, on the controlling terminal (/dev/tty). Then append it to main.log (`log_ending`)."""
    if not any(_reached(stream, message) for stream in (sys.stderr, sys.stdout)):
        _tell_terminal(message)
    log_ending(message, level)


def _reached(stream: TextIO | None, message: str) -> bool:
    """Print `message` on `stream`; False where the stream is closed (None) or its reader is gone (a
    `_SurvivingStream` finds out by this very write)."""
    if stream is None or getattr(stream, "gone", False):
        return False
    print(message, file=stream, flush=True)
    return not getattr(stream, "gone", False)


def _tell_terminal(message: str) -> None:
    """`message` on the controlling terminal, where this process is in its foreground (a background job writing
    there could be stopped by SIGTTOU); nothing without one (a batch job, a daemon)."""
    try:
        with open("/dev/tty", "w") as tty:
            if os.tcgetpgrp(tty.fileno()) == os.getpgrp():
                tty.write(message.rstrip("\n") + "\n")
    except OSError:  # no controlling terminal (ENXIO), or it hung up too
        pass
