"""``python -m attnctrl`` = the ``attnctrl`` command."""

import sys

from .cli.main import main

sys.exit(main())
