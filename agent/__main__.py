"""``python -m agent`` is ``edge-agent``."""

import sys

from agent.tools.cli import main

sys.exit(main())
