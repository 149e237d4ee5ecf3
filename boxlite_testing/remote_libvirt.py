"""A "remote" libvirt host on this machine: a second libvirtd that shares no files with us.

Why: the libvirt backend must work against a daemon on another machine, with no shared
filesystem, through libvirt's own remote protocol. Here the other machine is a private mount
namespace: a holder process (``unshare --mount``) keeps it alive, with empty tmpfs over
libvirt's state, run and log directories (so this daemon and the host's own libvirtd never
meet), a private copy of /etc/libvirt (pools it defines stay its own), and an empty tmpfs over
every path in ``hide`` (the client's BOXLITE_HOME: anything of ours the daemon could open by
path is gone). libvirtd and its virtlogd run inside it (``nsenter``), listening on
``qemu+tcp://127.0.0.1:PORT/system`` with ``auth_tcp = "none"``: loopback only, tests only.

The daemon can be stopped and started again while the namespace (and the QEMUs it runs)
lives on, as a real host's daemon restarts: :meth:`RemoteLibvirtd.restart_daemon`.

Use: ``with RemoteLibvirtd(hide=[home]) as remote: ... remote.uri``; or from a shell (CI's
conformance run): ``python3 -m boxlite_testing.remote_libvirt start --port 16599 --hide DIR``
(prints the URI; the state file says what to stop) and ``... stop``. Needs root, util-linux
(``unshare``, ``nsenter``) and libvirt-daemon-system.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from boxlite_core.vmm.procstat import reap, stat_fields

#: where ``python3 -m boxlite_testing.remote_libvirt start`` records what ``stop`` ends
STATE_FILE = Path("/run/boxlite-remote-libvirtd.json")
#: libvirt's directories the namespace gets empty (tmpfs): state, run, cache, logs
PRIVATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
#: seconds the daemon has to listen
READY_LIMIT = 60.0
STOP_LIMIT = 10.0

_CONF = """\
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "{port}"
auth_tcp = "none"
"""

#: the holder: make the namespace's mounts, then wait (its life is the namespace's)
_HOLDER = """\
set -e
mount --make-rprivate /
for d in {private}; do mkdir -p "$d"; mount -t tmpfs -o mode=0755 boxlite-remote "$d"; done
for d in "$@"; do mkdir -p "$d"; mount -t tmpfs -o mode=0700 boxlite-remote-hidden "$d"; done
stage=$(mktemp -d /tmp/boxlite-remote-etc.XXXXXX)
cp -a /etc/libvirt/. "$stage"/
mount --bind "$stage" /etc/libvirt
mkdir -p /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
echo ready
exec sleep infinity
"""


def missing() -> str | None:
    """None if a remote daemon can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces)"
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"),
                          ("libvirtd", "libvirt-daemon-system"),
                          ("virtlogd", "libvirt-daemon-system")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian package {package})"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(pid: int) -> None:
    """SIGTERM the process group ``pid`` leads, SIGKILL what is still running after
    STOP_LIMIT. The leader is our child and is reaped here: a zombie still answers
    ``killpg(pid, 0)``, which made every stop wait the whole limit (10 s per daemon)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_LIMIT
    while time.monotonic() < deadline:
        reap(pid)
        if not _group_running(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count: orphans are
    reaped late by this machine's PID 1)."""
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


@attrs.define
class RemoteLibvirtd:
    """A libvirtd in a private mount namespace, reached at :attr:`uri` (see module docs)."""

    hide: list[Path] = attrs.field(factory=list, converter=lambda v: [Path(p) for p in v])
    port: int = attrs.field(factory=free_port)
    holder: int | None = None
    daemon: int | None = None
    workdir: Path | None = None

    @property
    def uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    def __enter__(self) -> RemoteLibvirtd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        why = missing()
        if why:
            raise RuntimeError(f"remote libvirtd: {why}")
        self.workdir = Path(tempfile.mkdtemp(prefix="boxlite-remote-libvirtd."))
        (self.workdir / "libvirtd.conf").write_text(_CONF.format(port=self.port))
        script = _HOLDER.format(private=" ".join(PRIVATE_DIRS))
        holder = subprocess.Popen(
            ["unshare", "--mount", "--fork", "--", "sh", "-c", script, "holder",
             *map(str, self.hide)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        self.holder = holder.pid
        line = holder.stdout.readline() if holder.stdout else b""
        if line.strip() != b"ready":
            err = holder.stderr.read().decode(errors="replace") if holder.stderr else ""
            self.stop()
            raise RuntimeError(f"remote libvirtd: the mount namespace failed: {err.strip()}")
        self.start_daemon()

    def _inner_pid(self) -> int:
        """The pid of ``sleep infinity`` inside the namespace (unshare's child)."""
        assert self.holder is not None
        children = Path(f"/proc/{self.holder}/task/{self.holder}/children").read_text().split()
        if not children:
            raise RuntimeError("remote libvirtd: the namespace holder has no child")
        return int(children[0])

    def start_daemon(self) -> None:
        """virtlogd + libvirtd in the namespace; returns once libvirtd accepts on the port."""
        assert self.workdir is not None
        enter = ["nsenter", "-t", str(self._inner_pid()), "-m", "--"]
        log = (self.workdir / "libvirtd.log").open("ab")
        script = (
            "virtlogd -p /run/libvirt/virtlogd.pid & "
            f"exec libvirtd --listen -f {self.workdir / 'libvirtd.conf'} "
            "-p /run/libvirt/libvirtd.pid"
        )
        proc = subprocess.Popen([*enter, "sh", "-c", script], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.daemon = proc.pid
        deadline = time.monotonic() + READY_LIMIT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 1):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        tail = (self.workdir / "libvirtd.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"remote libvirtd did not listen on 127.0.0.1:{self.port}: {tail}")

    def stop_daemon(self) -> None:
        """End libvirtd and virtlogd; the namespace and any running QEMU stay."""
        if self.daemon is not None:
            _kill_group(self.daemon)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.daemon, 0)
            self.daemon = None

    def restart_daemon(self) -> None:
        self.stop_daemon()
        self.start_daemon()

    def stop(self) -> None:
        """End the daemon, every QEMU it still runs, and the namespace."""
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.destroy_domains()
        self.stop_daemon()
        if self.holder is not None:
            _kill_group(self.holder)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.holder, 0)
            self.holder = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def run(self, argv: list[str]) -> str:
        """Run ``argv`` on the "remote host" (in the namespace); its stdout. Raises
        CalledProcessError on failure."""
        return subprocess.run(["nsenter", "-t", str(self._inner_pid()), "-m", "--", *argv],
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def destroy_domains(self) -> list[str]:
        """Destroy every domain of the daemon (what a test left); their names."""
        out = subprocess.run(["virsh", "-c", self.uri, "list", "--name"], capture_output=True,
                             text=True, timeout=60).stdout
        names = [n for n in out.split() if n]
        for name in names:
            subprocess.run(["virsh", "-c", self.uri, "destroy", name], capture_output=True,
                           timeout=60)
        return names

    def to_json(self) -> str:
        return json.dumps({"port": self.port, "holder": self.holder, "daemon": self.daemon,
                           "workdir": str(self.workdir), "hide": [str(p) for p in self.hide]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m boxlite_testing.remote_libvirt")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the daemon; print its URI")
    start.add_argument("--port", type=int, default=16599)
    start.add_argument("--hide", action="append", default=[], help="a path it must not see")
    sub.add_parser("stop", help="stop what start started")
    args = parser.parse_args(argv)
    if args.command == "start":
        remote = RemoteLibvirtd(hide=args.hide, port=args.port)
        remote.start()
        STATE_FILE.write_text(remote.to_json())
        print(remote.uri)
        return 0
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        print("remote libvirtd: nothing to stop", file=sys.stderr)
        return 0
    RemoteLibvirtd(hide=data["hide"], port=data["port"], holder=data["holder"],
                   daemon=data["daemon"], workdir=Path(data["workdir"])).stop()
    STATE_FILE.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
