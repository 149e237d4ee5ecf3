"""QEMU's server sockets bound by the host (listeners.py): the argv rewrite, and a real QEMU
that takes a console connection made before it started, greets on a QMP socket dialled before
it started, and takes a second console client after the first one left (a restarted writer).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from boxlite_core.errors import EngineError
from boxlite_qemu.listeners import bound, connect_now, pass_listeners

QEMU = shutil.which("qemu-system-x86_64")


def test_only_the_bound_chardevs_get_an_fd(tmp_path: Path) -> None:
    odd = tmp_path / "a,b" / "console.sock"  # QEMU's option syntax doubles the comma
    argv = ["qemu", "-chardev", f"socket,id=console,path={str(odd).replace(',', ',,')},"
            "server=on,wait=on", "-chardev", "socket,id=fs0,path=/run/vfs.sock",
            "-drive", f"file={tmp_path}/path=x,format=raw"]
    out = pass_listeners(argv, {str(odd): 7})
    assert out[2] == "socket,id=console,fd=7,server=on,wait=on"
    assert out[3:] == argv[3:]  # virtiofsd's socket (QEMU is its client) and the rest
    assert argv[2].startswith("socket,id=console,path=")  # the plan's argv is not changed


def test_a_bound_path_missing_from_the_argv_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"no socket chardev with path=/elsewhere/qmp.sock"):
        pass_listeners(["qemu", "-chardev", "socket,id=qmp,path=/here/qmp.sock"],
                       {"/elsewhere/qmp.sock": 5})


def test_a_failed_bind_removes_what_was_bound(tmp_path: Path) -> None:
    first = tmp_path / "one.sock"
    with pytest.raises(EngineError, match="cannot create the socket"), \
            bound([first, tmp_path / "missing-dir" / "two.sock"]):
        pass
    assert not first.exists()


def _greeting(sock: socket.socket) -> dict:
    sock.settimeout(20)
    return json.loads(sock.makefile("rb").readline())


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_qemu_serves_sockets_bound_before_it_started(tmp_path: Path) -> None:
    console, qmp = tmp_path / "console.sock", tmp_path / "qmp.sock"
    argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-chardev", f"socket,id=console,path={console},server=on,wait=on",
            "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-mon", "chardev=console,mode=readline"]
    with bound([console, qmp]) as socks:
        writer = connect_now(console)  # before QEMU exists: waits in the backlog
        monitor = connect_now(qmp)
        proc = subprocess.Popen(
            pass_listeners(argv, {p: s.fileno() for p, s in socks.items()}),
            pass_fds=[s.fileno() for s in socks.values()],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # wait=on was met by the connection made before QEMU ran; QMP greets the client
        # that dialled before QEMU ran
        assert "QMP" in _greeting(monitor)
        writer.settimeout(20)
        assert b"QEMU" in writer.recv(4096)  # the readline monitor's banner on the console
        writer.close()  # the writer dies; a restarted one connects to the same path
        again = socket.socket(socket.AF_UNIX)
        again.settimeout(20)
        again.connect(str(console))
        assert b"QEMU" in again.recv(4096)
        again.close()
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=20)
        monitor.close()
    assert proc.returncode is not None, err
