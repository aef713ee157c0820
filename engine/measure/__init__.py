"""Measurement: fair timing (`timing`), what merging buys (`speed`), the training loader per worker
(`loader_timing`), an export checked against PyTorch (`parity`). Reporting it is `engine.report`."""
