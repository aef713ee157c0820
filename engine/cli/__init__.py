"""The command line, before any work: checked against the schema, and its run folder claimed."""
