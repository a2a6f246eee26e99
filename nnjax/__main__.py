"""``python -m nnjax demo``."""

import sys

from nnjax.app.cli import main

sys.exit(main())
