"""Measurement: fair timing (`timing`), what merging buys (`speed`), the training loader per worker
(`loader_timing`); an export checked against PyTorch is `engine.tasks.export`. Reporting it is `engine.report`."""
