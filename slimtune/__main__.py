"""`python -m slimtune …` is the `slimtune` command."""

from slimtune.cli.main import main

raise SystemExit(main())
