"""A standby shim (shimctl.warm_shim): started ahead, given its box by the start that needs it.

The promises: the start takes it (no new interpreter then) and it serves like any shim;
once given a box it is that box's process for cleanup, although its argv does not name the
box; and one never given a box leaves with the process that started it, however that ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from boxlite_core.channel import shimctl
from boxlite_core.channel.client import AgentClient
from boxlite_core.runtime.cleanup import leftover_processes
from boxlite_core.vmm.procstat import alive
from boxlite_testing.waits import wait_for

REPO = Path(__file__).resolve().parents[2]


def test_a_start_takes_the_standby_and_cleanup_knows_it_as_the_boxs(agent_factory):
    agent = agent_factory()
    shimctl.warm_shim()
    standby = shimctl._standby
    assert standby is not None
    argv = Path(f"/proc/{standby.pid}/cmdline").read_bytes()
    assert str(agent.box_dir).encode() not in argv  # it was started before the box existed
    client = AgentClient.connect(agent.box_dir, timeout=30, is_alive=agent.is_alive,
                                 console_tail=agent.console_tail)
    try:
        assert client._transport.pid == standby.pid  # taken, not a new interpreter
        assert shimctl._standby is None
        assert client.ping()["version"]
        assert (agent.box_dir / shimctl.SHIM_CLAIM_NAME).is_socket()
        # a crashed start's recovery finds it by the socket it bound in the box directory
        assert standby.pid in [pid for pid, _ in leftover_processes(agent.box_dir)]
        assert "READY on" in (agent.box_dir / shimctl.SHIM_LOG).read_text()
    finally:
        client.close()
    assert shimctl.stop_shim(agent.box_dir)
    wait_for(f"the shim {standby.pid} to exit", lambda: not alive(standby.pid, None), 10)
    assert not (agent.box_dir / shimctl.SHIM_CLAIM_NAME).exists()


def test_an_unused_standby_leaves_with_the_process_that_started_it(tmp_path):
    """Killed with SIGKILL (no cleanup of its own runs), its standby still goes: the pipe it
    waits on closes."""
    script = textwrap.dedent(
        """
        import sys, time
        from boxlite_core.channel import shimctl
        shimctl.warm_shim()
        print(shimctl._standby.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                              stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert parent.stdout is not None
        standby = int(parent.stdout.readline())
        assert alive(standby, None)
        time.sleep(0.5)  # well into its start-up
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    wait_for(f"standby shim {standby} to leave with its starter",
             lambda: not alive(standby, None), 15)
