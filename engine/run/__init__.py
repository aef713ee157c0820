"""What every task runs inside: the session (`session`: device, precision, processes, the model), runtime settings
and torchrun (`runtime`), checkpoints (`checkpoint.read_checkpoint`, the one reader), old configs in today's names
(`compat`), the run folder's name, lock and whole-file writes (`folder_claim`), results.json (`results`), a console
that may go away and main.log's ending line (`console`)."""
