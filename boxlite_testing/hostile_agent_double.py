"""Test double of a guest that replaced its agent: the real agent, except that Download of a
path for which a crafted tar exists in $BOXLITE_TEST_STREAMS streams those bytes instead.

Everything else is real: the gRPC server, the serial-port stand-in, the host's shim and
client. File name of a crafted stream: the requested path with '/' as '__' plus '.tar'.

Run as ``python -m boxlite_testing.hostile_agent_double AGENT-ARGS…`` with PYTHONPATH naming
the tree under test first (its boxlite_core is the agent that runs), then this repository.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from boxlite_core.agent import files
from boxlite_testing.tarcraft import crafted_name

STREAMS = Path(os.environ["BOXLITE_TEST_STREAMS"])
_real_download = files.download


def download(reaper, root, path):  # the signature of files.download
    crafted = STREAMS / crafted_name(path)
    if not crafted.exists():
        return _real_download(reaper, root, path)
    data = crafted.read_bytes()
    return iter([data[i : i + 65536] for i in range(0, len(data), 65536)])


files.download = download
sys.argv[0] = "boxlite_core.agent"
runpy.run_module("boxlite_core.agent", run_name="__main__", alter_sys=True)
