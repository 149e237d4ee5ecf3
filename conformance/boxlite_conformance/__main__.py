"""``python -m boxlite_conformance`` — the same as the ``boxlite-conformance`` script."""

import sys

from .cli import main

sys.exit(main())
