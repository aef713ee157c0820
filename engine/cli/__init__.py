"""The command line, before any work: checked, its run folder claimed, old configs upgraded."""
