"""``python -m agent.tools.doctor``: the same as ``edge-agent doctor``."""

import sys

from agent.tools.doctor.main import doctor_main

sys.exit(doctor_main(sys.argv[1:]))
