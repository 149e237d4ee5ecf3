"""shim.log is capped and rotated: a guest forcing port re-opens cannot grow it without bound,
and it no longer accumulates across boots.

The real shim process runs against a port double (a unix socket server standing in for the
VM's virtio-serial chardev: it says READY, then hangs up as soon as the host sends anything,
as a hostile guest may do on every connection). Each such hang-up makes the shim log a
"port connection ended ... re-opening" and a "READY again" line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from boxlite_core.channel import port as channel_port
from boxlite_core.channel import shimctl

#: the tree whose boxlite_core this test imported: the shim child runs the same code
REPO = Path(shimctl.__file__).resolve().parents[2]
#: the shim's default cap of shim.log (boxlite_core.channel.shim.LOG_MAX_BYTES)
SHIM_LOG_CAP = 1024 * 1024


class HangUpPort:
    """The guest end of the agent port: READY on every attach, hang-up on the first byte."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.attaches = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.attaches += 1
            with conn:
                try:
                    conn.sendall(channel_port.READY)
                    conn.recv(1)  # the host spoke (or left): hang up
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _start_shim(box: Path, *extra: str) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    with open(box / shimctl.SHIM_LOG, "ab") as log:  # as shimctl._spawn_shim does
        proc = subprocess.Popen(
            [sys.executable, "-m", "boxlite_core.channel.shim", "--box-dir", str(box),
             "--port", str(box / channel_port.PORT_NAME), "--timeout", "20", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while not (box / shimctl.SHIM_JSON).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"shim did not serve: {(box / shimctl.SHIM_LOG).read_bytes()[-2000:]!r}")
        time.sleep(0.05)
    assert json.loads((box / shimctl.SHIM_JSON).read_text())["pid"] == proc.pid
    return proc


def _force_reopens(box: Path, count: int) -> None:
    """What a guest hanging up on every host connection costs the shim: one re-open each."""
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(box / shimctl.PRIVATE_BRIDGE_NAME))
            client.sendall(b"x")
            assert client.recv(16) == b""  # relay torn down: the guest hung up


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


def _logs(box: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(box.glob(shimctl.SHIM_LOG + "*"))}


@pytest.fixture
def box(tmp_path: Path):
    box = tmp_path / "box"
    box.mkdir()
    port = HangUpPort(box / channel_port.PORT_NAME)
    yield box
    port.close()


def test_shim_log_flood_double_stays_under_the_cap(box):
    cap = 2048
    proc = _start_shim(box, "--log-max-bytes", str(cap))
    try:
        for _ in range(3):  # stack dumps go to fd 2 without Python's print: capped too
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.2)
        dumped = _logs(box)
        assert all(size <= cap for size in dumped.values()), dumped
        assert any("Thread 0x" in (box / name).read_text() for name in dumped)
        _force_reopens(box, 40)  # ~80 lines, ~6 KiB: more than the 3 files can hold
    finally:
        _stop(proc)
    sizes = _logs(box)
    assert set(sizes) == {"shim.log", "shim.log.1", "shim.log.2"}, sizes
    assert all(size <= cap for size in sizes.values()), sizes
    # oldest to newest: the last line written may have rotated shim.log an instant before
    oldest_first = ("shim.log.2", "shim.log.1", "shim.log")
    everything = "".join((box / name).read_text() for name in oldest_first)
    last = everything.rstrip().splitlines()[-3:]
    assert "exiting: signal SIGTERM" in "\n".join(last), last  # the newest lines are kept
    assert "re-open:" not in "\n".join(last), last  # closing is not reported as a VM failure
    assert "port connection ended" in everything and "READY again" in everything


def test_shim_log_of_earlier_boots_is_rotated_not_appended_double(box):
    # an earlier boot left shim.log just under the cap; this boot's lines do not pile on top
    old = b"".join(b"%08d earlier boot line of the shim log..........\n" % i for i in range(21000))
    old = old[: SHIM_LOG_CAP - 64]
    (box / "shim.log").write_bytes(old)
    proc = _start_shim(box)
    try:
        _force_reopens(box, 3)
    finally:
        _stop(proc)
    sizes = _logs(box)
    assert sizes["shim.log"] <= SHIM_LOG_CAP, sizes
    assert (box / "shim.log.1").read_bytes() == old  # rotated whole, on its line boundary
    assert "exiting: signal SIGTERM" in (box / "shim.log").read_text()
