"""Several Runtimes on one home, in one process and across processes, keep sqlite's locks.

Closing any descriptor of a file drops every POSIX lock the process holds on it. A runtime
that opened and closed ``boxlite.db`` itself (e.g. to set its mode) while another runtime in
the same process had a connection silently released that connection's locks; the next process
to close its own connection then thought it was the last user, deleted ``-wal``/``-shm`` and
the first runtime failed with "disk I/O error" (seen in the VM suite, which opens a second
Runtime while its module's Runtime is live and the CLI runs in subprocesses).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from boxlite_core.runtime.runtime import Runtime

TOUCH_DB = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1])\n"
    "c.execute('SELECT count(*) FROM boxes').fetchall()\n"
    "c.close()\n"
)


def test_a_second_runtime_keeps_the_first_ones_database_locks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = Runtime(home, recover=False)
    try:
        assert first.list() == []
        second = Runtime(home, recover=False)  # same process, same home
        try:
            for _ in range(3):  # other processes come and go (CLI calls)
                subprocess.run([sys.executable, "-c", TOUCH_DB, str(home / "boxlite.db")],
                               check=True, timeout=60)
            assert (home / "boxlite.db-shm").exists(), "another process deleted -shm under us"
            assert first.list() == [] and second.list() == []
        finally:
            second.close()
    finally:
        first.close()
