"""A run outlives its console: Ctrl-C through `| tee` (tee dies first), SIGHUP from a closed terminal, and
`nohup`. Real processes in their own process group, with the signals a terminal sends."""

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from cli_helpers import ROOT, write_image_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)"),
]
MOVED = r"\| *[1-9][0-9]*/[0-9]+ \["  # a progress bar past its first step: the loader's workers are running
DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)


def train_args(tmp_path: Path, run: Path, epochs: int = 3, steps: int = 0) -> list[str]:
    folder = write_image_folder(tmp_path / "images", {"train": 150, "val": 8}, size=32)
    return [
        "task=train",
        "runtime.device=cpu",
        "model=vit_tiny_test",
        "tome.r=2",
        "seed=0",
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "runtime.num_workers=2",
        "trainer.batch_size=4",
        f"trainer.epochs={epochs}",
        "trainer.warmup_epochs=0",
        f"hydra.run.dir={run}",
        *([f"trainer.max_steps_per_epoch={steps}", "trainer.max_val_steps=1"] if steps else []),
    ]


def as_a_shell_starts_it(ignore: tuple[int, ...] = ()) -> None:
    """A terminal's child: default dispositions (pytest's workers may ignore some), `ignore`d ones as nohup."""
    for signum in DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN if signum in ignore else signal.SIG_DFL)


def wait_for(pattern: str, read, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not re.search(pattern, read()):
        assert process.poll() is None, f"ended before {pattern!r}:\n{read()[-3000:]}"
        assert time.time() < deadline, f"no {pattern!r} in {timeout} s:\n{read()[-3000:]}"
        time.sleep(0.05)


def last_line(path: Path) -> str:
    """main.log's last line, without the logging prefix ('[time][logger][LEVEL] - ')."""
    line = [line for line in path.read_text().splitlines() if line.strip()][-1]
    return re.sub(r"^\[[^]]*\]\[[^]]*\]\[[A-Z]+\] - ", "", line)


def with_terminal(terminal: str) -> None:
    """In the child: a session of its own whose controlling terminal is `terminal` (a pty), as a login's shell."""
    os.setsid()
    fd = os.open(terminal, os.O_RDWR)
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    os.close(fd)


def read_terminal(master: int) -> str:
    """What the terminal shows by now (its output, however long it runs on)."""
    shown = b""
    while select.select([master], [], [], 0.5)[0]:
        shown += os.read(master, 4096)
    return shown.decode(errors="replace")


def test_ctrl_c_through_tee_saves_and_says_the_resume_command_on_the_terminal(tmp_path):
    """`python main.py ... 2>&1 | tee run.log` in a terminal, Ctrl-C: the terminal signals the job, tee dies
    first and the run's next write meets a closed pipe. The run still saves last.pt, and the line that says how
    to go on is in main.log and on the terminal itself (a pty, the run's controlling terminal)."""
    run, tee_log = tmp_path / "run", tmp_path / "run.log"
    master, slave = os.openpty()
    terminal = os.ttyname(slave)
    main = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *train_args(tmp_path, run)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: (with_terminal(terminal), as_a_shell_starts_it()),
    )
    tee = subprocess.Popen(
        ["tee", str(tee_log)],
        stdin=main.stdout,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: (os.setpgid(0, 0), as_a_shell_starts_it()),
    )
    main.stdout.close()  # only tee reads the pipe: once tee is gone, a write to it fails (EPIPE)
    wait_for(MOVED, lambda: tee_log.read_text() if tee_log.exists() else "", main)
    for process in (tee, main):  # Ctrl-C: SIGINT to the job (tee, the run, its loader workers)
        os.killpg(process.pid, signal.SIGINT)
    assert tee.wait(60) == -signal.SIGINT  # tee died of it, as in a terminal
    code = main.wait(120)
    shown = read_terminal(master)
    os.close(master), os.close(slave)
    assert code == 128 + signal.SIGINT, (run / "main.log").read_text()[-3000:]
    assert (run / "checkpoints" / "last.pt").exists() and not list(run.rglob("*.tmp"))
    assert not (run / ".lock").exists()
    ending = last_line(run / "main.log")
    assert re.search(r"stopped by SIGINT at epoch 1 step \d+; state saved in ", ending), ending
    assert ending.endswith(
        f"continue with: {sys.executable} main.py task=train hydra.run.dir={run} trainer.resume=true"
    )
    assert "Traceback" not in (run / "main.log").read_text()
    assert ending in shown.replace("\r\n", "\n"), shown[-3000:]
    assert ending not in tee_log.read_text()  # tee was gone: the terminal is the only place it could be seen


def test_sighup_saves_and_stops_as_sigterm_does_and_nohup_goes_on(tmp_path):
    """A closed terminal (SIGHUP to the run): last.pt saved, exit 129, main.log says so. Under nohup (SIGHUP
    ignored) the same signal changes nothing: the run finishes."""
    hung_up, nohup = tmp_path / "hup", tmp_path / "nohup"
    logs = {run: open(tmp_path / f"{run.name}.out", "w") for run in (hung_up, nohup)}
    processes = {}
    for run, steps, ignore in ((hung_up, 0, ()), (nohup, 20, (signal.SIGHUP,))):
        processes[run] = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), *train_args(tmp_path, run, 1 if steps else 3, steps)],
            cwd=tmp_path,
            stdout=logs[run],
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda ignore=ignore: as_a_shell_starts_it(ignore),
        )
    for run, process in processes.items():  # the terminal closes: SIGHUP to the whole job, workers included
        wait_for(MOVED, (tmp_path / f"{run.name}.out").read_text, process)
        assert process.poll() is None, f"{run.name} ended before the hang-up"
        os.killpg(process.pid, signal.SIGHUP)
    codes = {run: process.wait(180) for run, process in processes.items()}
    for log in logs.values():
        log.close()
    assert codes[hung_up] == 128 + signal.SIGHUP, (tmp_path / "hup.out").read_text()[-3000:]
    assert (hung_up / "checkpoints" / "last.pt").exists()
    assert last_line(hung_up / "main.log").startswith("stopped by SIGHUP at epoch 1 step ")
    assert codes[nohup] == 0, (tmp_path / "nohup.out").read_text()[-3000:]
    assert last_line(nohup / "main.log").startswith("done: ")


def test_a_signal_during_a_block_that_must_not_be_cut_waits_for_its_end(capsys):
    """ctrl_c_after_this (the export's trace): SIGTERM is said at once, the block runs to its end, then the task
    stops with Interrupted naming SIGTERM; a real signal to this process."""
    import signal as signals

    from engine.errors import Interrupted
    from engine.run.console import ctrl_c_after_this, raise_interrupted

    previous = signals.signal(signals.SIGTERM, raise_interrupted)
    finished = []
    try:
        with pytest.raises(Interrupted) as stopped:
            with ctrl_c_after_this("the test's block"):
                os.kill(os.getpid(), signals.SIGTERM)
                finished.append(True)  # reached: the signal was held
    finally:
        signals.signal(signals.SIGTERM, previous)
    assert finished and stopped.value.signum == signals.SIGTERM
    assert "SIGTERM: stopping when the test's block ends" in capsys.readouterr().err
