"""Ctrl-C as a terminal sends it: SIGINT to the whole process group of a real `main.py`, loader workers
included, with SIGINT at its default disposition (a process a script starts in the background inherits
SIGINT ignored, and Python then installs no KeyboardInterrupt handler: that would hide the bug)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from cli_helpers import ROOT, write_image_folder

from engine.run.console import signal_name

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
MOVED = r"\| *[1-9][0-9]*/[0-9]+ \["  # a progress bar past its first step: the loader's workers are running
CPU = ["runtime.device=cpu", "model=vit_tiny_test", "tome.r=2", "seed=0"]


class Terminal:
    """`python main.py ARGS` in its own process group, as a shell in a terminal starts it."""

    def __init__(self, args: list[str], cwd) -> None:
        self.output = ""
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            self.output += chunk.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until `text` is printed. (A SIGINT in the very milliseconds a DataLoader forks its workers is lost by
        the main process, so the tests wait for a progress bar that has moved, as a person would.)"""
        deadline = time.time() + timeout
        while not re.search(text, self.output):
            assert self.process.poll() is None, f"ended before {text!r}:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"no {text!r} in {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def ctrl_c(self, timeout: float = 120, signum: int = signal.SIGINT) -> tuple[int, list[str]]:
        """SIGINT (or `signum`: a scheduler's SIGTERM, a closed terminal's SIGHUP) to the whole group (the main
        process and its loader workers); the exit code and the lines."""
        os.killpg(self.process.pid, signum)
        code = self.process.wait(timeout)
        self.reader.join(5)
        lines = [line for line in self.output.replace("\r", "\n").splitlines() if line.strip()]
        return code, lines


def said_once(lines: list[str], text: str) -> str:
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), "\n".join(lines[-40:])
    matches = [line for line in lines if text in line]
    assert len(matches) == 1, "\n".join(lines[-40:])
    return matches[0]


@pytest.mark.slow
def test_ctrl_c_in_training_saves_and_prints_the_resume_command(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"train": 150, "val": 8}, size=32)
    run = tmp_path / "run"
    args = [
        "task=train",
        *CPU,
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "runtime.num_workers=2",
        "trainer.batch_size=4",
        "trainer.epochs=3",
        "trainer.warmup_epochs=0",
        f"hydra.run.dir={run}",
    ]
    terminal = Terminal(args, tmp_path)
    terminal.wait_for(MOVED)
    code, lines = terminal.ctrl_c()
    assert code == 128 + signal.SIGINT
    line = said_once(lines, "stopped by SIGINT")
    assert line.startswith("stopped by SIGINT at epoch 1 step ")  # numbered as the progress bar numbers it
    assert line.endswith(f"continue with: {sys.executable} main.py task=train hydra.run.dir={run} trainer.resume=true")
    assert (run / "checkpoints" / "last.pt").exists() and not list(run.rglob("*.tmp"))
    assert not (run / ".lock").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from cli_helpers import SMOKE, run_main

    work = tmp_path_factory.mktemp("interrupt")
    run_main("task=train", *SMOKE, "trainer.epochs=1", f"hydra.run.dir={work / 'run'}", cwd=work)
    return work / "run" / "checkpoints" / "best.pt"


ELSEWHERE = {  # task: its command-line keys after ckpt=, what shows it is running, whether it keeps files
    "eval": (
        ["dataset=synthetic", "dataset.val_size=40000", "runtime.eval_batch_size=8", "runtime.num_workers=2"],
        MOVED,
        False,
    ),
    "export": (["export.samples=8"], "exporting ", False),
    "benchmark": (["benchmark.repeats=2000", "benchmark.loader=false"], MOVED, False),
    "visualize": (["visualize.num_samples=60", "visualize.blocks=[0,1]"], MOVED, True),
}


SIGNALS = [  # each task meets Ctrl-C or a signal a scheduler or a closed terminal sends
    ("eval", signal.SIGINT),
    ("eval", signal.SIGTERM),
    ("export", signal.SIGTERM),
    ("benchmark", signal.SIGHUP),
    ("visualize", signal.SIGTERM),
]


@pytest.mark.parametrize("task, signum", SIGNALS, ids=[f"{t}-{signal.Signals(s).name}" for t, s in SIGNALS])
@pytest.mark.slow
def test_a_signal_in_any_other_task_is_one_line_and_keeps_only_what_was_written(tmp_path, checkpoint, task, signum):
    """eval (loader workers on), export (mid-trace), benchmark, visualize: exit 128 + signal, one line, no
    traceback, the lock released; a task that had written nothing leaves no run folder; visualize keeps the grids
    it drew, and its main.log ends with the line."""
    keys, marker, keeps = ELSEWHERE[task]
    name = signal_name(signum)
    source = [f"ckpt={checkpoint}"] if task != "benchmark" else ["model=vit_tiny_test", "dataset=synthetic"]
    terminal = Terminal([f"task={task}", *source, "runtime.device=cpu", *keys], tmp_path)
    terminal.wait_for(marker)
    code, lines = terminal.ctrl_c(signum=signum)
    assert code == 128 + signum, "\n".join(lines[-30:])
    line = said_once(lines, f"interrupted by {name} during task={task}")
    held = [line for line in lines if "stopping when the onnx trace" in line]
    assert len(held) <= 1  # a signal during the trace is held and said at once (tests/test_console.py: always)
    if keeps:
        (run,) = (tmp_path / "outputs" / task).glob("*/*")
        assert line.endswith(f"what it had written is in {run}") and list(run.glob("sample_0.png"))
        assert (run / "main.log").read_text().rstrip().splitlines()[-1].endswith(line)
        assert not (run / ".lock").exists()
    else:
        assert line.endswith("nothing was kept") and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_stops_it_with_one_line(tmp_path, checkpoint):
    args = [
        "-m",
        "task=eval",
        f"ckpt={checkpoint}",
        "runtime.device=cpu",
        "dataset=synthetic",
        "dataset.val_size=40000",
        "runtime.eval_batch_size=8",
        "runtime.num_workers=0",
        "tome.r=0,2",
    ]
    terminal = Terminal(args, tmp_path)
    terminal.wait_for(MOVED)
    code, lines = terminal.ctrl_c()
    assert code == 128 + signal.SIGINT
    said_once(lines, "interrupted by Ctrl-C (SIGINT)")
    assert not [p for p in (tmp_path / "multirun").rglob("results.json")]  # the sweep stopped in its first job
