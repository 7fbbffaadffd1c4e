"""`python -m pha_cli ...` is `pha ...` (subprocesses of tests and benches start it this way)."""

import sys

from .app import main

sys.exit(main())
