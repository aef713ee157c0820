"""The tasks of ``python main.py task=NAME``, one module each with ``run(cfg, run_dir, overrides)``; the table
from a task's name to its module is `engine.task_table.TASKS` (re-exported here for old imports)."""

from ..task_table import TASKS, Task, runner

__all__ = ["TASKS", "Task", "runner"]
