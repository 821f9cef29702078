"""The `expbuild` command line: one module per command group."""
