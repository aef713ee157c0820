"""The research CLI's engine, grouped by role (the library it drives is `regtome`, through its public names):

- `cli/`: the entry, before any work: keys and values checked against `schema`, the run folder claimed (`claim`).
  Nothing else in the engine imports it.
- `run/`: what every task runs inside: the session (device, precision, processes, the model), runtime settings
  and torchrun (`runtime`), checkpoints (`checkpoint.read_checkpoint`, the one reader), old configs in today's
  names (`compat`), the run folder's name, lock and whole-file writes (`folder_claim`), results.json (`results`),
  a console that may go away and main.log's ending line (`console`).
- `models/`, `training/`, `measure/`, `report/`, `tasks/` (one module per task): see each package's overview.
- `schema`: every key's type, default, check and help; `validate` before any work. `task_table`: `TASKS`.
"""
