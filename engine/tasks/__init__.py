"""The tasks of ``python main.py task=NAME``, one module each with ``run(cfg, run_dir, overrides)``."""
