"""The CLI's engines: training, evaluation, benchmarks and visualisation (Hydra-free functions)."""
