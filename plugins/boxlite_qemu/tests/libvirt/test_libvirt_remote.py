"""Boxes on a "remote" libvirt host: a second libvirtd in a private mount namespace where the
client's home does not exist (boxlite_testing.remote_libvirt), reached over qemu+tcp only.

Nothing here can work through a shared filesystem: the daemon sees an empty tmpfs where our
home is, so every file the VM uses must have been uploaded through the connection, and the
agent and console must come back through it too.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError, GuestError, StateError
from boxlite_core.models import BoxOptions, BoxStatus
from boxlite_core.runtime.runtime import Runtime
from boxlite_core.volumes.resolve import remote_user_volumes
from boxlite_testing import remote_libvirt
from boxlite_testing.cli import boxlite
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm

#: seconds within which a dead daemon must turn into an error (keepalive 5 s x 3, + slack)
OUTAGE_LIMIT = 60.0


@pytest.fixture(scope="module")
def remote(shared_home: Path):
    why = remote_libvirt.missing()
    if why:
        pytest.skip(f"remote libvirtd: {why}")
    pytest.importorskip("libvirt", reason="libvirt-python not installed")
    with remote_libvirt.RemoteLibvirtd(hide=[shared_home]) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def env(remote, monkeypatch_module):
    # the remote is this machine, whose /dev/kvm cannot boot guests: TCG there
    monkeypatch_module.setenv("BOXLITE_LIBVIRT_DOMAIN_TYPE", "qemu")
    monkeypatch_module.delenv("BOXLITE_LIBVIRT_URI", raising=False)
    return {"BOXLITE_LIBVIRT_DOMAIN_TYPE": "qemu"}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def runtime(shared_home: Path, env):
    with Runtime(shared_home) as rt:
        yield rt


@pytest.fixture(scope="module")
def box(runtime, remote):
    """One box on the remote host, shared by the module's tests."""
    b = runtime.create(BoxOptions(image="busybox", name=unique("remote"), memory_mib=256,
                                  host=remote.uri, backend="libvirt"))
    b.start()
    yield b
    runtime.remove(b.id, force=True)


def _virsh(remote, *args: str) -> str:
    return subprocess.run(["virsh", "-c", remote.uri, *args], capture_output=True, text=True,
                          timeout=60, check=True).stdout


def _volumes(remote) -> list[str]:
    return [line.split()[0] for line in _virsh(remote, "vol-list", "boxlite").splitlines()[2:]
            if line.strip()]


def test_box_runs_there_with_nothing_of_ours_on_its_disk(box, remote, shared_home):
    result = box.exec(["sh", "-c", "echo hello; cat /etc/hostname"], timeout=60)
    assert result.exit_code == 0 and result.text.startswith("hello"), result.stderr
    domain = f"boxlite-{box.id}"
    xml = _virsh(remote, "dumpxml", domain)
    assert str(shared_home) not in xml and "/root/" not in xml
    assert "/var/lib/libvirt/boxlite/" in xml
    # the console came back through the connection, into the box's log here
    assert "boxlite-init" in "".join(c.decode(errors="replace") for c in box.log_chunks())
    vols = _volumes(remote)
    assert f"box-{box.id}-bxrootfs.qcow2" in vols
    # every content volume is complete (its marker) and the record says where the box is
    assert all(f"{v}.ok" in vols for v in vols if v.startswith("sha256-") and "." not in v)
    assert box.record.options.host == remote.uri


def test_cp_goes_through_the_agent(box, tmp_path, shared_home):
    src = tmp_path / "in.txt"
    src.write_text("to the far box\n")
    done = boxlite("cp", str(src), f"{box.name}:/root/in.txt", home=shared_home)
    assert done.returncode == 0, done.stderr
    assert box.exec(["cat", "/root/in.txt"], timeout=60).text == "to the far box\n"
    out = tmp_path / "out"
    done = boxlite("cp", f"{box.name}:/root/in.txt", str(out), home=shared_home)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "to the far box\n"


def test_ls_shows_the_host(box, remote, shared_home):
    done = boxlite("ls", home=shared_home)
    assert done.returncode == 0, done.stderr
    line = next(row for row in done.stdout.splitlines() if box.name in row)
    assert remote.uri in line and "running" in line
    assert done.stdout.splitlines()[0].split()[:5] == ["ID", "NAME", "IMAGE", "BACKEND", "HOST"]


def test_a_second_box_uploads_nothing_again(runtime, remote, box):
    before = {v for v in _volumes(remote) if v.startswith("sha256-")}
    other = runtime.create(BoxOptions(image="busybox", name=unique("remote2"), memory_mib=256,
                                      host=remote.uri, backend="libvirt"))
    try:
        other.start()
        assert other.exec(["true"], timeout=60).exit_code == 0
        assert {v for v in _volumes(remote) if v.startswith("sha256-")} == before
    finally:
        runtime.remove(other.id, force=True)
    # its volume went with it; the shared ones stay
    assert not [v for v in _volumes(remote) if v.startswith(f"box-{other.id}-")]
    assert {v for v in _volumes(remote) if v.startswith("sha256-")} == before


def test_daemon_outage_mid_exec_is_a_guest_error_and_keeps_the_box(box, remote, shared_home):
    outcome: dict[str, object] = {}

    def long_exec() -> None:
        began = time.monotonic()
        try:
            outcome["result"] = box.exec(["sleep", "600"], timeout=300)
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - began

    worker = threading.Thread(target=long_exec, daemon=True)
    worker.start()
    time.sleep(3)  # the exec is under way in the box
    remote.stop_daemon()
    try:
        worker.join(OUTAGE_LIMIT)
        assert not worker.is_alive(), "an exec outlived its daemon by a minute"
        assert isinstance(outcome.get("error"), GuestError), outcome
        # another command while the daemon is away: a clear error, nothing settled
        done = boxlite("exec", box.name, "--", "true", home=shared_home)
        assert done.returncode != 0
        assert "cannot tell whether its VM runs" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        listed = boxlite("ls", home=shared_home)
        line = next(row for row in listed.stdout.splitlines() if box.name in row)
        assert "unknown" in line and "unreachable" in line, line
    finally:
        remote.start_daemon()
    assert box.refresh().status is BoxStatus.RUNNING
    result = box.exec(["echo", "back"], timeout=120)
    assert result.exit_code == 0 and result.text == "back\n"


def test_remove_while_unreachable_keeps_the_box(runtime, remote):
    other = runtime.create(BoxOptions(image="busybox", name=unique("remote3"), memory_mib=256,
                                      host=remote.uri, backend="libvirt"))
    other.start()
    other.stop()
    remote.stop_daemon()
    try:
        with pytest.raises(StateError, match="retry when it is reachable"):
            runtime.remove(other.id)
        assert runtime.get(other.id).status is BoxStatus.STOPPED
    finally:
        remote.start_daemon()
    runtime.remove(other.id)
    assert not [v for v in _volumes(remote) if v.startswith(f"box-{other.id}-")]


def test_volumes_are_that_machines_directories(runtime, remote, shared_home):
    # a directory only the remote host has (under the home it cannot see of ours, it has its
    # own empty one), and one only we have
    there = shared_home / unique("remote-only")
    remote.run(["sh", "-c", f"mkdir -p {there} && echo remote-data > {there}/f.txt"])
    here = shared_home / unique("local-only")
    here.mkdir()
    try:
        other = runtime.create(BoxOptions(image="busybox", name=unique("remote4"),
                                          memory_mib=256, host=remote.uri, backend="libvirt",
                                          volumes=[f"{here}:/data"]))
        try:
            with pytest.raises(ConfigError, match="not a directory on"):
                other.start()
            assert f"boxlite-{other.id}" not in _virsh(remote, "list", "--name")
        finally:
            runtime.remove(other.id, force=True)
        other = runtime.create(BoxOptions(image="busybox", name=unique("remote5"),
                                          memory_mib=256, host=remote.uri, backend="libvirt",
                                          volumes=[f"{there}:/data"]))
        try:
            other.start()
            result = other.exec(["sh", "-c", "cat /data/f.txt && echo back > /data/g.txt"],
                                timeout=60)
            assert result.text == "remote-data\n", result.stderr
            assert remote.run(["cat", f"{there}/g.txt"]) == "back\n"
        finally:
            runtime.remove(other.id, force=True)
    finally:
        here.rmdir()


def test_relative_volume_path_is_refused_for_a_remote_box():
    with pytest.raises(ConfigError, match="must be absolute"):
        remote_user_volumes(["data:/data"], "qemu+ssh://h/system")


def test_prune_deletes_only_what_nothing_there_uses(runtime, remote, box, tmp_path):
    import libvirt

    from boxlite_qemu.libvirt_pool import RemotePool

    stray = tmp_path / "stray.bin"
    stray.write_bytes(b"an old kit's file " * 1000)
    conn = libvirt.open(remote.uri)
    try:
        orphan = RemotePool(remote.uri, conn).upload(stray).name
    finally:
        conn.close()
    before = set(_volumes(remote))
    gone = runtime.prune_hosts()
    assert gone == [(remote.uri, orphan)]
    assert set(_volumes(remote)) == before - {orphan, orphan + ".ok"}
    # what the running box boots from and writes to stayed
    assert box.exec(["true"], timeout=60).exit_code == 0
    assert runtime.prune_hosts() == []
