"""``python -m fastpo.engine <algorithm> ...``: the same as the ``fastpo`` command."""

import sys

from .cli import main

sys.exit(main())
