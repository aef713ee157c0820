"""What every task runs inside: session, runtime, processes, checkpoints, the run folder and its record."""
