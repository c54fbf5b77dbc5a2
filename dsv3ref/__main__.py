"""`python -m dsv3ref ...`: see dsv3ref.cli."""

import sys

from dsv3ref.cli import main

sys.exit(main())
