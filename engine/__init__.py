"""The research CLI's engine, grouped by role (the library it drives is `regtome`, through its public names):

- `cli/`: the entry, before any work (see its overview); nothing else in the engine imports it.
- `run/`, `models/`, `training/`, `measure/`, `report/`, `tasks/`: see each package's overview.
- `schema`: every key's type, default, check and help; `validate` before any work. `task_table`: `TASKS`.
"""
