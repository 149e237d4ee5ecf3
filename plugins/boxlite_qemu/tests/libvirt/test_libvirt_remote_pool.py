"""The remote storage pool against a real second libvirtd (no VM is booted): uploads that
meet another client's upload of the same content, and interrupted ones."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from boxlite_testing import remote_libvirt
from boxlite_testing.cli import boxlite


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    why = remote_libvirt.missing()
    if why:
        pytest.skip(f"remote libvirtd: {why}")
    pytest.importorskip("libvirt", reason="libvirt-python not installed")
    hidden = tmp_path_factory.mktemp("hidden")
    with remote_libvirt.RemoteLibvirtd(hide=[hidden]) as daemon:
        yield daemon


def _pool(uri: str):
    from boxlite_qemu.libvirt_conn import open_connection
    from boxlite_qemu.libvirt_pool import RemotePool

    return RemotePool(uri, open_connection(uri))


def _content(tmp_path: Path, name: str, mib: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(mib * 2**20))
    return path


def test_concurrent_upload_of_the_same_content_waits_for_the_peer(remote, tmp_path):
    """Two clients upload the same base at once (two boxes of one image started from two
    machines): the second waits for the first, both get the volume, nothing fails. The
    first upload is slowed (a pause per 4 MiB piece, in its progress callback) so that the
    second surely meets it in progress, as it would over a slow link."""
    from boxlite_qemu.libvirt_pool import MARK, content_name, file_digest

    local = _content(tmp_path, "base.ext4", 24)
    name = content_name(file_digest(local))
    started = threading.Event()
    results: dict[str, object] = {}

    def slow(what: str, done: int, total: int) -> None:
        started.set()
        time.sleep(0.8)

    def first() -> None:
        try:
            results["first"] = _pool(remote.uri).upload(local, slow)
        except Exception as exc:  # the test reports it
            results["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    try:
        second = _pool(remote.uri).upload(local)
    finally:
        thread.join(120)
    assert not isinstance(results["first"], Exception), results["first"]
    assert second.name == name
    pool = _pool(remote.uri)
    assert pool.find(name) is not None and pool.find(name + MARK) is not None
    got = remote.run(["sha256sum", second.path]).split()[0]
    assert content_name(got) == name


def test_interrupted_upload_is_uploaded_again(remote, tmp_path):
    """A content volume without its marker and that nobody writes (a client killed mid
    upload): the next upload replaces it with the verified content."""
    from boxlite_qemu.libvirt_pool import MARK, _volume_xml, content_name, file_digest

    local = _content(tmp_path, "kit.img", 3)
    name = content_name(file_digest(local))
    pool = _pool(remote.uri)
    pool.pool().createXML(_volume_xml(name, local.stat().st_size, "raw"), 0)  # left empty
    os.environ["BOXLITE_LIBVIRT_TIMEOUT"] = "3"
    try:
        vol = _pool(remote.uri).upload(local)
    finally:
        del os.environ["BOXLITE_LIBVIRT_TIMEOUT"]
    assert pool.find(name + MARK) is not None
    assert content_name(remote.run(["sha256sum", vol.path]).split()[0]) == name


def test_volume_directory_check_accepts_a_pool_directory_and_concurrent_checks(remote):
    """-v of a directory some pool of that host serves (its ``default`` pool's
    /var/lib/libvirt/images, or boxlite's own pool) is a directory, and two box starts
    checking the same directory at once both pass; a missing path is still refused."""
    from boxlite_core.errors import ConfigError
    from boxlite_qemu import libvirt_remote

    pool = _pool(remote.uri)
    served = Path(pool.path)
    pool.pool()  # defined and running at its path
    libvirt_remote.check_directories(pool.conn, remote.uri, [served])
    libvirt_remote.check_directories(pool.conn, remote.uri, [Path(str(served) + "/")])
    errors: list[Exception] = []

    def check() -> None:
        conn = _pool(remote.uri).conn
        for _ in range(15):
            try:
                libvirt_remote.check_directories(conn, remote.uri, [Path("/tmp")])
            except Exception as exc:  # the test reports it
                errors.append(exc)
                return

    threads = [threading.Thread(target=check) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    with pytest.raises(ConfigError, match="/no/such/dir: not a directory on"):
        libvirt_remote.check_directories(pool.conn, remote.uri, [Path("/no/such/dir")])


class _SilentDaemonDouble:
    """A double of a hung libvirtd: a TCP listener that accepts and never answers (a real
    one cannot be made to hang on demand). Counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.sock.getsockname()[1]}/system"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        for conn in [*self.accepted, self.sock]:
            conn.close()


def test_a_hung_host_costs_one_bounded_call_per_command_not_one_per_box(tmp_path,
                                                                        monkeypatch):
    """Boxes recorded running on a host whose daemon accepts and never answers: opening the
    runtime (every CLI command recovers) and listing them asks that host once, not once per
    box (each attempt waits the whole BOXLITE_LIBVIRT_TIMEOUT); the records stay as they
    were, and each says why its host is unknown."""
    pytest.importorskip("libvirt", reason="libvirt-python not installed")
    from boxlite_core.models import BoxOptions, BoxStatus
    from boxlite_core.runtime.runtime import Runtime
    from boxlite_testing.oci import d, f, layer_tar, oci_layout_files, write_tar

    monkeypatch.setenv("BOXLITE_LIBVIRT_TIMEOUT", "2")
    monkeypatch.delenv("BOXLITE_LIBVIRT_URI", raising=False)
    daemon = _SilentDaemonDouble()
    try:
        archive = write_tar(oci_layout_files([layer_tar([d("bin"), f("bin/sh", b"x", 0o755)])],
                                             ref="t:1"), tmp_path / "img.tar")
        home = tmp_path / "home"
        with Runtime(home) as rt:
            rt.images.import_path(archive)
            ids = [rt.create(BoxOptions(image="t:1", backend="libvirt", host=daemon.uri)).id
                   for _ in range(3)]
            for box_id in ids:
                rt.store.set_status(box_id, BoxStatus.STARTING)
                rt.store.set_status(box_id, BoxStatus.RUNNING)
                rt.box_dir(box_id).mkdir(parents=True, exist_ok=True)
                (rt.box_dir(box_id) / "vm.json").write_text(json.dumps(
                    {"backend": "libvirt", "uri": daemon.uri, "name": f"boxlite-{box_id}",
                     "uuid": "6f1d3b3e-0000-4000-8000-000000000001", "id": 1, "pid": None}))
        assert daemon.accepted == []
        with Runtime(home) as rt:
            records = rt.list(all=False)
            problems = [rt.host_problem(r) for r in records]
        assert sorted(r.id for r in records) == sorted(ids)
        assert all(r.status is BoxStatus.RUNNING for r in records)
        assert all(p and "did not answer" in p for p in problems), problems
        assert len(daemon.accepted) == 1
        # `boxlite ls`: each box unknown, and why (not the host's URI again, cut short)
        out = boxlite("ls", home=home, env={"BOXLITE_LIBVIRT_TIMEOUT": "2"})
        assert out.returncode == 0, out.stderr
        rows = [line for line in out.stdout.splitlines() if daemon.uri in line]
        assert len(rows) == 3
        assert all("unknown (host unreachable: libvirt virConnectOpen did not answer in 2 s"
                   in row and "recorded: running" in row for row in rows), rows
    finally:
        daemon.close()


def test_remove_deletes_the_box_volumes_from_the_pool_its_launch_used(remote, tmp_path,
                                                                      monkeypatch):
    """A box launched with BOXLITE_LIBVIRT_POOL=other, removed from a shell without it:
    its volumes go from the pool they are in (the launch plan says which), not left there
    while the box's record is gone."""
    from boxlite_qemu.libvirt_backend import LibvirtBackend
    from boxlite_qemu.libvirt_conn import open_connection
    from boxlite_qemu.libvirt_pool import RemotePool, box_volume_name

    box_id = "0123456789ab"
    other = RemotePool(remote.uri, open_connection(remote.uri), "boxlite-other",
                       "/var/lib/libvirt/boxlite-other")
    base = other.upload(_content(tmp_path, "base.ext4", 1))
    volume = box_volume_name(box_id, "bxrootfs")
    other.overlay(volume, base, 64 * 2**20)
    box_dir = tmp_path / box_id
    box_dir.mkdir()
    (box_dir / "vm.json").write_text(json.dumps(
        {"backend": "libvirt", "uri": remote.uri, "name": f"boxlite-{box_id}",
         "uuid": "6f1d3b3e-0000-4000-8000-000000000002", "id": 1, "pid": None}))
    (box_dir / "plan.json").write_text(json.dumps(
        {"backend": "libvirt", "data": {"uri": remote.uri, "remote": {
            "pool": "boxlite-other", "pool_path": "/var/lib/libvirt/boxlite-other"}}}))
    monkeypatch.delenv("BOXLITE_LIBVIRT_POOL", raising=False)
    LibvirtBackend(remote.uri).forget(box_dir)
    assert other.find(volume) is None
    assert other.find(base.name) is not None  # content stays for prune


def _image_home(tmp_path: Path) -> Path:
    from boxlite_testing.oci import d, f, layer_tar, oci_layout_files, write_tar

    archive = write_tar(oci_layout_files([layer_tar([d("bin"), f("bin/sh", b"x", 0o755)])],
                                         ref="t:1"), tmp_path / "img.tar")
    home = tmp_path / "home"
    out = boxlite("images", "import", str(archive), home=home)
    assert out.returncode == 0, out.stderr
    return home


@pytest.mark.parametrize(("backend", "host", "says"), [
    ("qemu", "qemu+ssh://me@far.example/system", "runs boxes on this machine only"),
    ("qemu", "/tmp/x", "runs boxes on this machine only"),
    ("libvirt", "junk", "takes a libvirt URI"),
    ("libvirt", "far.example", "takes a libvirt URI"),
])
def test_create_refuses_a_host_its_backend_cannot_use(tmp_path, backend, host, says):
    """`create --backend B --host H` where B runs boxes here only, or cannot read H: one
    error at create, and no box (not a record whose every start fails)."""
    home = _image_home(tmp_path)
    out = boxlite("create", "--backend", backend, "--host", host, "t:1", home=home)
    assert out.returncode != 0
    assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    listed = boxlite("ls", "-a", home=home)
    assert listed.returncode == 0 and "t:1" not in listed.stdout, listed.stdout


def test_bridge_waits_on_a_hung_daemon_with_one_connection(monkeypatch):
    """The stream bridge asks a hung daemon (accepts, never answers) whether its domain is
    gone every WATCH_INTERVAL: one connection attempt waits, not one more thread and
    socket per check (a day of outage exhausted the bridge's file descriptors)."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python not installed")
    from boxlite_qemu.libvirt_bridge import Bridge

    monkeypatch.setenv("BOXLITE_LIBVIRT_TIMEOUT", "0.5")
    daemon = _SilentDaemonDouble()
    try:
        bridge = Bridge(libvirt, daemon.uri, "6f1d3b3e-0000-4000-8000-000000000003")
        before = threading.active_count()
        for _ in range(8):
            assert bridge.domain_gone() is False  # unreachable is not gone
        assert len(daemon.accepted) == 1
        assert threading.active_count() <= before + 1
    finally:
        daemon.close()
