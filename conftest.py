"""Suite-wide: tests talk only to this machine, and share one fixtures plugin.

An image name that is not in a test's store would otherwise be pulled from Docker Hub
(pull-on-create). Tests that exercise pulling do so against a registry on 127.0.0.1 and turn
the implicit pull back on themselves.

The shared fixtures, helpers and doubles are the ``boxlite_testing`` package beside this file
(pytest puts this directory on sys.path for this conftest). Subprocesses a test starts (a
script run with ``-c``, a double run with ``-m``) find it through PYTHONPATH, set here once;
it goes last, so a PYTHONPATH pointing at another tree under test still wins.
"""

import os
from pathlib import Path

os.environ["BOXLITE_PULL"] = "never"  # set at import so CLI subprocesses inherit it
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).resolve().parent)])
)

pytest_plugins = ["boxlite_testing.plugin"]
