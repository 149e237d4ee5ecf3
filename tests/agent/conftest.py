"""Run the real guest agent natively (no VM) with a listening socket standing in for the
virtio-serial port, and a busybox container rootfs it really chroots into.

The agent process and the root come from boxlite_testing (native_agent.py; the
``busybox_root`` fixture is in its plugin), shared with the copy tests.
"""

from __future__ import annotations

import pytest

from boxlite_testing.native_agent import NativeAgent


@pytest.fixture
def agent_factory(tmp_path_factory, busybox_root):
    started: list[NativeAgent] = []

    def make(**kw) -> NativeAgent:
        box = tmp_path_factory.mktemp("box")
        agent = NativeAgent(box, **kw)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory, busybox_root):
    """One initialised agent shared by a module's tests (they do not change global state)."""
    from boxlite_core.channel.client import AgentClient

    agent = NativeAgent(tmp_path_factory.mktemp("box"))
    c = AgentClient.connect(
        agent.box_dir, timeout=30, is_alive=agent.is_alive, console_tail=agent.console_tail
    )
    c.init({"share": {"tag": str(busybox_root), "fstype": "bind"}, "hostname": "boxtest"})
    c.agent = agent  # for tests that need the process
    yield c
    c.close()
    agent.stop()
