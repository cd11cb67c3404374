"""``python -m wrapcal.cli``: the ``wrapcal`` command."""

import sys

from wrapcal.cli import main

sys.exit(main())
