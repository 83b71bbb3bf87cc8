"""``python -m refdir.cli``: the same as the ``refdir`` command."""

import sys

from refdir.cli import main

sys.exit(main())
