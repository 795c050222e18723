"""The `slimtune` command: a thin client of the Python API, one module per sub-command."""
