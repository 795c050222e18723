"""``python -m slimtune.studio``: the same as ``slimtune studio``."""

import sys

from slimtune.cli.studio_cmd import main

sys.exit(main())
