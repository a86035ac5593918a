"""``python -m dom0``: the privileged domain, started by hyperd."""

import sys

from dom0.main import main

sys.exit(main())
