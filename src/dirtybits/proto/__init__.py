"""Sans-I/O protocol cores (QMP, NBD)."""
