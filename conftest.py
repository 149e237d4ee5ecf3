"""Suite-wide safety: tests talk only to this machine.

An image name that is not in a test's store would otherwise be pulled from Docker Hub
(pull-on-create). Tests that exercise pulling do so against a registry on 127.0.0.1 and turn
the implicit pull back on themselves.
"""

import os

os.environ["BOXLITE_PULL"] = "never"  # set at import so CLI subprocesses inherit it
