"""``python -m conmh``: the ``conmh`` command (torchrun starts training this way)."""

import sys

from .cli import main

sys.exit(main())
