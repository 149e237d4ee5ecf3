"""Fixtures for copy tests: a native guest agent (real, or the hostile double) and a Box
wired to it.

The agent runs as in tests/agent (private mount + UTS namespaces, chroot into a busybox
root, the serial-port stand-in, the real shim and gRPC client). The Box is a real Box on a
real Runtime home whose agent connection is that native agent instead of a VM's: the code
under test (Box.copy_out, boxlite_core.transfer) is unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import boxlite_core

HERE = Path(__file__).resolve().parent
#: the tree whose boxlite_core is imported (the old tree when PYTHONPATH points at one)
CODE = Path(boxlite_core.__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location(
    "boxlite_agent_fixtures", HERE.parent / "agent" / "conftest.py"
)
agent_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agent_fixtures)


class CodeAgent(agent_fixtures.NativeAgent):
    """The agent of the tree under test (CODE), natively; ``streams`` set: the hostile
    double (hostile_agent.py) serving crafted Download streams from that directory."""

    def __init__(self, box_dir: Path, streams: Path | None = None) -> None:
        self.box_dir = box_dir
        self.port = box_dir / "agent.port"
        self.log = box_dir / "agent.log"
        env = dict(os.environ, PYTHONPATH=str(CODE), BOXLITE_TEST_REPO=str(CODE),
                   BOXLITE_TEST_STREAMS=str(streams))
        entry = [str(HERE / "hostile_agent.py")] if streams else ["-m", "boxlite_core.agent"]
        self._logf = open(self.log, "wb")  # noqa: SIM115 - lives as long as the agent
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", sys.executable,
             *entry, "--serial-listen", str(self.port),
             "--vsock-port", "0", "--state-dir", str(box_dir / "run")],
            env=env, stdout=self._logf, stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="session")
def guest_root(tmp_path_factory) -> Path:
    """The container root the native agent chroots into (the guest's files)."""
    reason = agent_fixtures._requirements()
    if reason:
        pytest.skip(reason)
    return agent_fixtures.build_busybox_root(tmp_path_factory.mktemp("guestroot") / "root")


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streams")


def _connect(agent, root: Path):
    from boxlite_core.channel.client import AgentClient

    client = AgentClient.connect(agent.box_dir, timeout=60, is_alive=agent.is_alive,
                                 console_tail=agent.console_tail)
    client.init({"share": {"tag": str(root), "fstype": "bind"}, "hostname": "copytest"})
    return client


def _box(home: Path, client):
    from boxlite_core.models import BoxOptions, BoxStatus
    from boxlite_core.runtime.box import Box
    from boxlite_core.runtime.records import BoxRecord
    from boxlite_core.runtime.runtime import Runtime

    rt = Runtime(home)
    record = BoxRecord(id="native0", name="native", status=BoxStatus.RUNNING,
                       options=BoxOptions(image="busybox"))
    box = Box(rt, record)
    box._live_client = lambda: client  # the native agent stands in for the VM's
    return rt, box


@pytest.fixture(scope="module")
def double_box(tmp_path_factory, guest_root, streams):
    """A Box whose agent is the hostile double; write crafted streams into ``streams``."""
    agent = CodeAgent(tmp_path_factory.mktemp("dbox"), streams)
    client = _connect(agent, guest_root)
    rt, box = _box(tmp_path_factory.mktemp("dhome"), client)
    yield box
    client.close()
    rt.close()
    agent.stop()


@pytest.fixture(scope="module")
def native_box(tmp_path_factory, guest_root):
    """A Box whose agent is the real (honest) agent, run natively."""
    agent = CodeAgent(tmp_path_factory.mktemp("nbox"))
    client = _connect(agent, guest_root)
    rt, box = _box(tmp_path_factory.mktemp("nhome"), client)
    yield box
    client.close()
    rt.close()
    agent.stop()
