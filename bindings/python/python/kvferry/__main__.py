"""``python -m kvferry``: the ``kvferry`` command."""

import sys

from kvferry._cli import main

sys.exit(main())
