"""The run-folder lock is an fcntl.flock the kernel releases: real processes started at the same instant, a holder
killed with SIGKILL, a lock file another host left, a forked child of the holder, and ranks other than 0."""

import json
import os
import signal
import subprocess
import sys

import pytest
from cli_helpers import ROOT, run_main

from engine.errors import UserError
from engine.run.folder_claim import LOCK_NAME, RunLock

TAKE = """
import os, sys, time
from pathlib import Path
from engine.errors import UserError
from engine.run.folder_claim import RunLock
folder, go, fork = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "fork"
say = lambda line: os.write(1, (line + "\\n").encode())  # one write each: lines of two processes never mix
say("ready")
while not go.exists():  # every process leaves this loop within microseconds of the others
    pass
try:
    RunLock(folder).acquire()
except UserError as err:
    say(f"refused: {err}")
    sys.exit(0)
if fork and os.fork() == 0:  # a child (a loader worker) outliving its parent for a while
    say("child running")  # after the at-fork hooks, which run first in the child
    time.sleep(60)
    os._exit(0)
say("took")
time.sleep(60)  # held until the test ends this process
"""


def take(folder, go, fork: bool = False) -> subprocess.Popen:
    """A process that takes the lock of `folder` once the file `go` exists, and holds it until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", TAKE, str(folder), str(go), "fork" if fork else "-"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for_line(process) == "ready"
    return process


def wait_for_line(process: subprocess.Popen) -> str:
    line = process.stdout.readline().strip()
    assert line, f"exited {process.wait()} without a word"
    return line


def test_two_processes_started_together_never_both_hold_the_folder(tmp_path):
    """Five rounds, each on a new folder: one with a leftover lock file from an older release, another host's."""
    for round in range(5):
        folder = tmp_path / f"run{round}"
        if round % 2:
            folder.mkdir()
            (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-node", "started": "yesterday"}))
        go = tmp_path / f"go{round}"
        processes = [take(folder, go) for _ in range(2)]  # both spinning
        go.touch()
        lines = sorted(wait_for_line(p) for p in processes)
        for p in processes:
            p.kill()
            p.wait(30)
        assert lines[1] == "took" and lines[0].startswith("refused:"), lines
        assert "in use by" in lines[0] and "delete" not in lines[0]
        RunLock(folder).acquire().release()  # free once the winner ended


def test_a_holder_killed_with_sigkill_leaves_a_folder_that_is_free_at_once(tmp_path):
    """Also when the holder had forked (a loader worker still running): the child never holds the lock."""
    (tmp_path / "go").touch()
    holder = take(tmp_path / "run", tmp_path / "go", fork=True)
    try:
        assert sorted(wait_for_line(holder) for _ in range(2)) == ["child running", "took"]
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "):
            RunLock(tmp_path / "run").acquire()
        os.kill(holder.pid, signal.SIGKILL)  # the holder only: its child lives on
        holder.wait(10)
        lock = RunLock(tmp_path / "run").acquire()  # at once: no pid to judge, no takeover
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / "run" / LOCK_NAME).exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the orphaned child


@pytest.mark.parametrize(
    "env",
    [{"RANK": "1", "LOCAL_RANK": "1"}, {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7"}],
    ids=["torchrun", "slurm"],
)
def test_a_rank_other_than_zero_never_removes_unlocks_or_writes_the_folder(tmp_path, env):
    """Rank 0 (here: this test) holds the folder; rank 1 fails a task, and runs a task of one process. A SLURM
    task knows its rank from SLURM_PROCID before it joins the process group (where RANK is set)."""
    folder = tmp_path / "run"
    lock = RunLock(folder).acquire()
    (folder / "main.log").write_text("rank 0 is working\n")
    try:
        failed = _with_env(env, "task=eval", f"ckpt={tmp_path / 'missing.pt'}", f"hydra.run.dir={folder}", cwd=tmp_path)
        assert failed.returncode == 2 and "does not exist" in failed.stderr
        assert (folder / "main.log").read_text() == "rank 0 is working\n" and (folder / LOCK_NAME).exists()
        with pytest.raises(UserError, match="in use by process"):
            RunLock(folder).acquire()  # rank 0's lock still holds
        benchmark = _with_env(
            env, "task=benchmark", "model=vit_tiny_test", "dataset=synthetic", f"hydra.run.dir={folder}", cwd=tmp_path
        )
        assert benchmark.returncode == 0 and sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "main.log"]
    finally:
        lock.release()


def _with_env(env: dict, *overrides: str, cwd):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return run_main(*overrides, cwd=cwd, check=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
