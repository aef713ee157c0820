"""Training: the loop (`loop`), building a run (`setup`), stopping on signals (`stop`)."""
