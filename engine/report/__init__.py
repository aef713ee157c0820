"""Reports of what was run and measured: sweep reports and paired statistics (`sweep`, `stats`, `labels`,
`sweep_plots`), the benchmark's files (`benchmark_report`), visualize's pictures (`figures`), register fates,
and the one matplotlib set-up (`pyplot`). The measurements themselves are `engine.measure`."""
