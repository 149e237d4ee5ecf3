"""probe() and attach() without a usable daemon: unavailable, with the reason and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from boxlite_core.errors import EngineError
from boxlite_qemu.libvirt_backend import LibvirtBackend, LibvirtHandle

BAD_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def test_probe_with_no_daemon_is_unavailable_with_fix(monkeypatch) -> None:
    pytest.importorskip("libvirt")
    monkeypatch.setenv("BOXLITE_LIBVIRT_URI", BAD_URI)
    result = LibvirtBackend().probe()
    assert not result.available
    assert BAD_URI in result.reason
    assert "libvirtd -d" in result.fix
    assert "apt-get install libvirt-daemon-system" in result.fix
    assert result.details["uri"] == BAD_URI


def test_handle_on_unreachable_daemon_raises_engine_error() -> None:
    pytest.importorskip("libvirt")
    handle = LibvirtHandle(BAD_URI, "boxlite-x", "00000000-0000-0000-0000-000000000000", 1, None)
    with pytest.raises(EngineError, match="libvirtd"):
        handle.is_running()


def test_probe_without_libvirt_python_double(tmp_path: Path) -> None:
    """libvirt-python hidden (sys.modules entry None): the module still imports, the backend
    is unavailable with the pip fix, and the registry lists it without a plugin failure."""
    code = (
        "import sys, json; sys.modules['libvirt'] = None\n"
        "from boxlite_qemu.libvirt_backend import LibvirtBackend\n"
        "from boxlite_core.plugins import PluginRegistry\n"
        "r = PluginRegistry()\n"
        "p = r.probe_all()['libvirt']\n"
        "print(json.dumps({'probe': p.to_dict(), 'failures': [f.to_dict() for f in "
        "r.failures if f.plugin == 'qemu']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["failures"] == []
    assert data["probe"]["available"] is False
    assert "libvirt-python" in data["probe"]["reason"]
    assert "boxlite-qemu[libvirt]" in data["probe"]["fix"]


def test_attach_without_record_is_none(tmp_path: Path) -> None:
    assert LibvirtBackend(BAD_URI, domain_type="qemu").attach(tmp_path) is None
    (tmp_path / "vm.json").write_text(json.dumps({"backend": "qemu", "pid": 1}))
    assert LibvirtBackend(BAD_URI, domain_type="qemu").attach(tmp_path) is None


# -- bounds: a daemon that never answers ----------------------------------------------------

import contextlib  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

REMOTE_PROGRAM = 0x20008086
REMOTE_PROC_DOMAIN_CREATE_XML = 10


class _SilentDaemonDouble:
    """A unix socket that accepts libvirt clients and never says a word: a stalled libvirtd
    as a real libvirt client sees it (`qemu+unix:///system?socket=PATH`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)  # held open, never read from, never answered

    def close(self) -> None:
        self._stop = True
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        self.sock.close()


class _CreateXmlSwallowingProxyDouble(_SilentDaemonDouble):
    """Relays a libvirt client to the real daemon, message by message, except that it
    swallows the createXML call: everything before it is real, createXML never answers."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.upstream = upstream
        self.swallowed = 0
        super().__init__(path)

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.upstream)
            self.conns += [conn, up]
            threading.Thread(target=self._down, args=(up, conn), daemon=True).start()
            threading.Thread(target=self._up, args=(conn, up), daemon=True).start()

    @staticmethod
    def _down(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    @staticmethod
    def _read(src: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = src.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _up(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                head = self._read(src, 4)
                (length,) = struct.unpack(">I", head)
                body = self._read(src, length - 4)
                program, _version, procedure = struct.unpack(">III", body[:12])
                if program == REMOTE_PROGRAM and procedure == REMOTE_PROC_DOMAIN_CREATE_XML:
                    self.swallowed += 1
                    continue
                dst.sendall(head + body)


@pytest.fixture
def silent_daemon(tmp_path: Path):
    pytest.importorskip("libvirt")
    double = _SilentDaemonDouble(tmp_path / "stalled-libvirt-sock")
    yield double
    double.close()


def test_probe_against_a_silent_daemon_double_fails_in_the_bound(silent_daemon, monkeypatch):
    monkeypatch.setenv("BOXLITE_LIBVIRT_TIMEOUT", "2")
    t0 = time.monotonic()
    result = LibvirtBackend(silent_daemon.uri, domain_type="qemu").probe()
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"probe took {elapsed:.1f}s against a 2 s bound"
    assert not result.available
    assert f"libvirt virConnectOpen on {silent_daemon.uri} did not answer in 2 s" in result.reason


def test_handle_against_a_silent_daemon_double_raises_named_engine_error(silent_daemon,
                                                                         monkeypatch):
    monkeypatch.setenv("BOXLITE_LIBVIRT_TIMEOUT", "2")
    handle = LibvirtHandle(silent_daemon.uri, "boxlite-x",
                           "00000000-0000-0000-0000-000000000000", 1, None)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"libvirt virConnectOpen on qemu\+unix:.* did not "
                                          r"answer in 2 s.*BOXLITE_LIBVIRT_TIMEOUT"):
        handle.is_running()
    assert time.monotonic() - t0 < 15


def test_createxml_that_never_answers_double_fails_in_the_bound(tmp_path, make_spec,
                                                               monkeypatch):
    """Real client, real daemon, real open/lookup round trips; only createXML is swallowed
    by the relaying double, as the stalled daemon of finding 8 did."""
    libvirt = pytest.importorskip("libvirt")
    real = Path("/run/libvirt/libvirt-sock")
    if not real.exists():
        pytest.skip("no system libvirtd socket at /run/libvirt/libvirt-sock")
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"system libvirtd not reachable ({exc})")
    proxy = _CreateXmlSwallowingProxyDouble(tmp_path / "proxy-sock", str(real))
    try:
        monkeypatch.setenv("BOXLITE_LIBVIRT_TIMEOUT", "3")
        backend = LibvirtBackend(proxy.uri, domain_type="qemu")
        box_dir = tmp_path / "box"
        box_dir.mkdir()
        plan = backend.plan(make_spec(box_dir, box_id=f"bnd{os.getpid()}"))
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"libvirt createXML on qemu\+unix:.* did not "
                                              r"answer in 3 s"):
            backend.launch(plan)
        assert time.monotonic() - t0 < 20
        assert proxy.swallowed == 1
        # and the swallowed call created nothing on the real daemon
        conn = libvirt.open("qemu:///system")
        try:
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByName(plan.data["name"])
        finally:
            conn.close()
    finally:
        proxy.close()


# -- /dev/kvm that libvirt's QEMU user cannot open -------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_probe_names_a_kvm_node_libvirts_qemu_user_cannot_open(tmp_path):
    """The state of finding 8 (root:root 0600, no udev), on a twin of /dev/kvm so the real
    node is left alone; the probe still talks to the real system daemon."""
    import stat
    import tempfile

    libvirt = pytest.importorskip("libvirt")
    from boxlite_core.vmm.kvm_access import daemon_running, libvirt_qemu_identity

    real = Path("/dev/kvm")
    if not real.exists() or libvirt_qemu_identity() is None or not daemon_running():
        pytest.skip("needs /dev/kvm, libvirt's QEMU user and a running libvirtd")
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"system libvirtd not reachable ({exc})")
    parent = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="boxlite-kvm-probe-"))
    try:
        node = parent / "kvm"
        os.mknod(node, 0o600 | stat.S_IFCHR, os.stat(real).st_rdev)
        backend = LibvirtBackend("qemu:///system", domain_type="qemu")
        backend.kvm_dev = node
        result = backend.probe()
        assert result.available, result.reason  # it works, but every call re-probes QEMU
        assert f"{node} is root:root 0600" in result.reason, result.reason
        assert "libvirt-qemu cannot open" in result.reason, result.reason
        assert result.fix.startswith("chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"), result.fix
        assert result.details["kvm_access"] in result.reason

        import grp

        os.chown(node, 0, grp.getgrnam("kvm").gr_gid)
        os.chmod(node, 0o660)
        fixed = backend.probe()
        assert fixed.available and not fixed.reason and "kvm_access" not in fixed.details
        # a session daemon runs QEMU as the caller: the check does not apply
        os.chmod(node, 0o600)
        session = LibvirtBackend("qemu:///session", domain_type="qemu")
        session.kvm_dev = node
        assert session._kvm_access_problem() is None
    finally:
        import shutil

        shutil.rmtree(parent, ignore_errors=True)


def test_a_call_that_answers_after_its_bound_hands_its_result_to_the_cleanup():
    """createXML that returns after we gave up must not leave a VM nobody tracks: the late
    result goes to on_abandoned (launch destroys the domain). Checked once by hand against
    the real daemon too (notes/hardening.md): the late domain was destroyed 2 s after it
    appeared."""
    from boxlite_qemu.libvirt_backend import LibvirtTimeout, bounded

    late: list[object] = []
    got = threading.Event()
    result = object()

    def slow() -> object:
        time.sleep(1.0)
        return result

    with pytest.raises(LibvirtTimeout, match=r"libvirt createXML on qemu:///x did not answer "
                                             r"in 0.2 s"):
        bounded("createXML", "qemu:///x", slow, timeout=0.2,
                on_abandoned=lambda r: (late.append(r), got.set()))
    assert got.wait(10) and late == [result]
    # a call that answers in time never reaches the cleanup
    assert bounded("x", "qemu:///x", lambda: 5, timeout=5,
                   on_abandoned=lambda r: late.append(r)) == 5
    assert late == [result]
