"""``python -m nnjax demo``."""

import sys

from nnjax.cli import main

sys.exit(main())
