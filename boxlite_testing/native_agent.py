"""The real guest agent run natively (no VM), for the agent and copy tests.

A listening unix socket stands in for the virtio-serial port (``--serial-listen``), and the
agent really chroots into a busybox container root, in private mount + UTS namespaces so its
mounts die with it. Needs root, util-linux ``unshare`` and busybox-static.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .homes import REPO

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000::/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
)
GROUP = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"


def missing_requirement() -> str | None:
    """Why a native agent cannot run here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mounts, chroot, namespaces)"
    if not shutil.which("unshare"):
        return "needs util-linux unshare"
    if not Path("/bin/busybox").exists():
        return "needs busybox-static (/bin/busybox)"
    return None


def build_busybox_root(root: Path) -> Path:
    """A container root at ``root``: /bin/busybox and its applets, users root/app/nobody."""
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
        module: str = "boxlite_core.agent",
        pythonpath: Sequence[Path] = (REPO,),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """serial: a virtio-serial stand-in at ``port``; vsock_listen: a vsock stand-in (no
        READY, a stream per connect) at ``vsock``; vsock_port: a real AF_VSOCK port (0 = none,
        which also keeps the agent from reading the host's /proc/cmdline for one).
        module: what runs (``python -m``), e.g. a double of the agent; pythonpath: where its
        code comes from, first entry first (the tree under test); env: extra variables."""
        self.box_dir = box_dir
        self.port = box_dir / "agent.port"
        self.vsock = box_dir / "agent.vsock"
        self.log = box_dir / "agent.log"
        channel = ["--serial-listen", str(self.port)] if serial else []
        if vsock_listen:
            channel += ["--vsock-listen", str(self.vsock)]
        channel += ["--vsock-port", str(vsock_port)]
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, pythonpath)),
                        **(env or {}))
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
                module,
                *channel,
                "--state-dir",
                str(box_dir / "run"),
            ],
            env=full_env,
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
        from boxlite_core.channel.shimctl import stop_shim

        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._logf.close()
        stop_shim(self.box_dir)  # it exits by itself when the port goes; do not rely on it
