"""The research CLI's engine, grouped by role (the library it drives is `regtome`, through its public names):

- `cli/`: the entry, before any work: keys and values checked against `schema` (`command_line`), the run
  folder claimed (`claim`). Nothing else in the engine imports it.
- `run/`: what every task runs inside: the session (device, precision, processes, the model), the
  runtime settings and torchrun (`runtime`), checkpoints (`checkpoint.read_checkpoint`, the one reader; a
  checkpoint's config rebuilt with this command line's keys), old configs read in today's names (`compat`),
  the run folder's name, lock and files written whole (`folder_claim`), results.json (`results.merge_record`,
  the r that ran), a console that may go away and main.log's ending line (`console`).
- `models/`: models built from the `model` and `tome` config groups (timm and transformers).
- `training/`: the training loop, the evaluation loop, their set-up, and stopping on signals.
- `schema`: every key's type, default, check and help (Hydra's ConfigStore); `validate` before any work.
- `task_table`: `TASKS`, each task's name to its module in `tasks/` (one module per task).
- `tasks/`: one module per task; each writes its own files (benchmark's tables and figure, visualize's
  pictures, export's parity check against PyTorch).
- `measure/`: fair timing, what merging buys, the training loader per worker.
- `report/`: sweep reports and paired statistics, register fates, and what every table and figure shares.
"""
