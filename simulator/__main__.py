"""``python -m simulator`` is ``elastic-sim``."""

import sys

from .cli import main

sys.exit(main())
