"""Fixtures for copy tests: a native guest agent (real, or the hostile double) and a Box
wired to it.

The agent runs as in tests/agent (boxlite_testing.native_agent: private mount + UTS
namespaces, chroot into a busybox root, the serial-port stand-in, the real shim and gRPC
client). The Box is a real Box on a real Runtime home whose agent connection is that native
agent instead of a VM's: the code under test (Box.copy_out, boxlite_core.transfer) is
unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import boxlite_core
from boxlite_testing.homes import REPO
from boxlite_testing.native_agent import NativeAgent, build_busybox_root, missing_requirement

#: the tree whose boxlite_core is imported (the old tree when PYTHONPATH points at one)
CODE = Path(boxlite_core.__file__).resolve().parents[1]


def code_agent(box_dir: Path, streams: Path | None = None) -> NativeAgent:
    """The agent of the tree under test (CODE), natively; ``streams`` set: the hostile
    double (boxlite_testing.hostile_agent_double) serving crafted Download streams from
    that directory."""
    if streams is None:
        return NativeAgent(box_dir, pythonpath=(CODE,))
    return NativeAgent(box_dir, module="boxlite_testing.hostile_agent_double",
                       pythonpath=(CODE, REPO), env={"BOXLITE_TEST_STREAMS": str(streams)})


@pytest.fixture(scope="session")
def guest_root(tmp_path_factory) -> Path:
    """The container root the native agent chroots into (the guest's files)."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    return build_busybox_root(tmp_path_factory.mktemp("guestroot") / "root")


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
    box = Box(rt.services, record)
    box._live_client = lambda: client  # the native agent stands in for the VM's
    return rt, box


@pytest.fixture(scope="module")
def double_box(tmp_path_factory, guest_root, streams):
    """A Box whose agent is the hostile double; write crafted streams into ``streams``."""
    agent = code_agent(tmp_path_factory.mktemp("dbox"), streams)
    client = _connect(agent, guest_root)
    rt, box = _box(tmp_path_factory.mktemp("dhome"), client)
    yield box
    client.close()
    rt.close()
    agent.stop()


@pytest.fixture(scope="module")
def native_box(tmp_path_factory, guest_root):
    """A Box whose agent is the real (honest) agent, run natively."""
    agent = code_agent(tmp_path_factory.mktemp("nbox"))
    client = _connect(agent, guest_root)
    rt, box = _box(tmp_path_factory.mktemp("nhome"), client)
    yield box
    client.close()
    rt.close()
    agent.stop()
