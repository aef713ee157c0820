"""Fair timing (`timing`), what merging buys (`speed`), the training loader per worker (`loader_timing`)."""
