"""``python -m engine`` is the ``clubsnap`` command."""

import sys

from .cli import main

sys.exit(main())
