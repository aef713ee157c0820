"""Measurement: fair timing (every case in one process, interleaved, after warm-up, synchronised; the
machine looked at first), what merging buys in inference and training (`speed`), the training loader per
worker (`loader_timing`), and an export checked against PyTorch (`parity`). Drawing and reporting what was
measured is `engine.report`."""
