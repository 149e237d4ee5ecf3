"""Run the real guest agent natively (no VM) with a listening socket standing in for the
virtio-serial port, and a busybox container rootfs it really chroots into."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000::/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
)
GROUP = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts, chroot, namespaces)"
    if not shutil.which("unshare"):
        return "needs util-linux unshare"
    if not Path("/bin/busybox").exists():
        return "needs busybox-static (/bin/busybox)"
    return None


def build_busybox_root(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "root").mkdir()
    (root / "home/app").mkdir(parents=True)
    os.chown(root / "home/app", 1000, 1000)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    return root


class NativeAgent:
    """The agent as a subprocess in private mount+UTS namespaces (so its mounts die with it)."""

    def __init__(
        self,
        box_dir: Path,
        *,
        serial: bool = True,
        vsock_listen: bool = False,
        vsock_port: int = 0,
    ) -> None:
        """serial: a virtio-serial stand-in at ``port``; vsock_listen: a vsock stand-in (no
        READY, a stream per connect) at ``vsock``; vsock_port: a real AF_VSOCK port (0 = none,
        which also keeps the agent from reading the host's /proc/cmdline for one)."""
        self.box_dir = box_dir
        self.port = box_dir / "agent.port"
        self.vsock = box_dir / "agent.vsock"
        self.log = box_dir / "agent.log"
        channel = ["--serial-listen", str(self.port)] if serial else []
        if vsock_listen:
            channel += ["--vsock-listen", str(self.vsock)]
        channel += ["--vsock-port", str(vsock_port)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.started = time.monotonic()
        self._logf = open(self.log, "wb")  # noqa: SIM115 - lives as long as the agent
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                sys.executable,
                "-m",
                "boxlite_core.agent",
                *channel,
                "--state-dir",
                str(box_dir / "run"),
            ],
            env=env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
        )

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def console_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        from boxlite_core.channel.transport import stop_shim

        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._logf.close()
        stop_shim(self.box_dir)  # it exits by itself when the port goes; do not rely on it


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory) -> Path:
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    return build_busybox_root(tmp_path_factory.mktemp("bbroot") / "root")


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
