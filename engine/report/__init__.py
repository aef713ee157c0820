"""Reports and measurements: sweep reports, paired statistics, fair timing, loader timing, register fates."""
