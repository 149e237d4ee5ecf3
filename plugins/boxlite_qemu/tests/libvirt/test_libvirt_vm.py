"""Real domains through libvirtd: boot the guest kit to READY, stop, kill, attach.

Skipped (with the reason) when libvirtd is not reachable; CI starts it (scripts/start-services).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from boxlite_core.channel.port import open_port
from boxlite_core.errors import StateError
from boxlite_core.tools import require_tool
from boxlite_core.vmm.spec import DiskSpec, ShareSpec
from boxlite_qemu.libvirt_backend import LibvirtBackend, LibvirtHandle

pytestmark = pytest.mark.vm


def _identity(path: Path) -> tuple[int, int, int, str]:
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), digest.hexdigest()


def _base_and_overlay(tmp_path: Path, box_dir: Path) -> tuple[Path, Path]:
    """A read-only 0444 raw base (like the disk strategy's cache) and a qcow2 overlay on it."""
    base = tmp_path / "cache" / "base.ext4"
    base.parent.mkdir()
    mkfs = require_tool("mkfs.ext4")
    subprocess.run([mkfs, "-q", "-F", "-L", "bxtest", str(base), "16M"], check=True)
    base.chmod(0o444)
    overlay = box_dir / "rootfs.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw",
                    "-b", str(base), str(overlay)], check=True)
    return base, overlay


def _cleanup(handle: LibvirtHandle | None) -> None:
    if handle is not None:
        try:
            handle.kill()
        finally:
            handle.release()


def test_boot_to_ready_then_stop_leaves_shared_images_untouched(
    tmp_path: Path, libvirt_uri: str, kit, make_spec
) -> None:
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    share = tmp_path / "share"
    share.mkdir()
    base, overlay = _base_and_overlay(tmp_path, box_dir)
    before = {p: _identity(p) for p in (base, kit.root_image, kit.kernel, kit.initrd)}
    spec = make_spec(
        box_dir, kernel=kit.kernel, initrd=kit.initrd, root_image=kit.root_image,
        cmdline=kit.cmdline, machine=kit.machine, memory_mib=512, box_id="lvtready",
        disks=(DiskSpec(overlay, "qcow2", serial="bxrootfs"),),
        shares=(ShareSpec("vol0", share, "9p", read_only=True),),
    )
    backend = LibvirtBackend(libvirt_uri)
    handle = backend.launch(backend.plan(spec))
    try:
        assert handle.is_running()
        sock, _rest = open_port(spec.agent.socket, deadline=time.monotonic() + 180,
                                is_alive=handle.is_running,
                                console_tail=lambda: spec.console_log.read_text(errors="replace"))
        sock.close()
        assert stat.S_IMODE(spec.agent.socket.stat().st_mode) == 0o600
        assert "boxlite-init: start" in spec.console_log.read_text(errors="replace")
        handle.stop(timeout=2.0)  # no ACPI daemon in the guest: shutdown, then destroy
        assert not handle.is_running()
        assert handle.wait(0)
        assert handle.exit_reason()
    finally:
        _cleanup(handle)
    after = {p: _identity(p) for p in before}
    assert after == before, "libvirt changed a shared image's owner, mode or content"
    assert overlay.stat().st_uid == os.getuid()


def test_kill_attach_and_vanish(tmp_path: Path, libvirt_uri: str, kit, make_spec) -> None:
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    spec = make_spec(box_dir, kernel=kit.kernel, initrd=kit.initrd,
                     root_image=kit.root_image, cmdline=kit.cmdline, box_id="lvtkill")
    backend = LibvirtBackend(libvirt_uri)
    plan = backend.plan(spec)
    handle = backend.launch(plan)
    try:
        assert handle.is_running()
        if handle.pid is not None:  # local daemon: QEMU's pid from libvirt's pid file
            cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes()
            assert b"qemu-system" in cmdline and b"boxlite-lvtkill" in cmdline
        with pytest.raises(StateError, match="already exists"):
            backend.launch(plan)
        handle.pause()
        assert handle.is_running()  # paused is still alive
        handle.resume()
        adopted = LibvirtBackend(libvirt_uri).attach(box_dir)  # a fresh process's view
        assert adopted is not None
        assert (adopted.uuid, adopted.pid) == (handle.uuid, handle.pid)
        assert adopted.is_running()
        adopted.kill()
        assert not adopted.is_running()
        assert "killed" in adopted.exit_reason()
        # the first handle sees the domain gone, and says why from libvirt's own log
        assert not handle.is_running()
        assert handle.wait(5)
        reason = handle.exit_reason()
        assert reason and "boxlite-lvtkill" in reason
        handle.kill()  # idempotent on a gone domain
        handle.stop()
        assert LibvirtBackend(libvirt_uri).attach(box_dir) is None
    finally:
        _cleanup(handle)


def test_domain_destroyed_behind_our_back(tmp_path: Path, libvirt_uri: str, kit,
                                         make_spec) -> None:
    virsh = shutil.which("virsh")
    if virsh is None:
        pytest.skip("virsh not installed (apt-get install libvirt-clients)")
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    spec = make_spec(box_dir, kernel=kit.kernel, initrd=kit.initrd,
                     root_image=kit.root_image, cmdline=kit.cmdline, box_id="lvtvanish")
    backend = LibvirtBackend(libvirt_uri)
    handle = backend.launch(backend.plan(spec))
    try:
        subprocess.run([virsh, "-c", libvirt_uri, "destroy", "boxlite-lvtvanish"],
                       check=True, capture_output=True)
        assert not handle.is_running()
        reason = handle.exit_reason()
        assert reason and "boxlite-lvtvanish" in reason
        if libvirt_uri == "qemu:///system":  # libvirt's domain log says how it ended
            assert "destroyed" in reason
    finally:
        _cleanup(handle)


@pytest.mark.parametrize("sharer", ["9p", "virtiofs"])
def test_boxlite_run_end_to_end(
    tmp_path: Path, libvirt_uri: str, kit, sharer: str, request: pytest.FixtureRequest
) -> None:
    """`boxlite run --backend libvirt` with a read-only volume through each sharer."""
    boxlite = shutil.which("boxlite")
    if boxlite is None:
        pytest.skip("the boxlite CLI is not installed (pip install -e .)")
    # unix socket paths hold 107 bytes: pytest's tmp_path is too deep for BOXDIR/*.sock
    home = Path(tempfile.mkdtemp(prefix="bxlv-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    (home / "cache").mkdir(parents=True)
    # reuse the session's guest kit cache instead of building another one
    (home / "cache" / "guest-kit").symlink_to(kit.directory.parents[1])
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "hello").write_text("hello-from-host\n")
    env = {**os.environ, "BOXLITE_HOME": str(home), "BOXLITE_LIBVIRT_URI": libvirt_uri}
    out = subprocess.run(
        [boxlite, "run", "--rm", "--backend", "libvirt", "--sharer", sharer,
         "-v", f"{vol}:/data:ro", "busybox", "sh", "-c",
         "uname -a; cat /data/hello; touch /data/new || echo ro-ok"],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Linux" in out.stdout
    assert "hello-from-host" in out.stdout
    assert "ro-ok" in out.stdout
    assert not (vol / "new").exists()


def test_a_domain_whose_launch_was_cut_short_is_still_found(
    tmp_path: Path, libvirt_uri: str, kit, make_spec
) -> None:
    """The process running launch() is killed after createXML created the domain but before
    the full vm.json was written (issue 12, finding 4): libvirt keeps the transient domain,
    so a later process (rm -f, recovery) must still find it by the name launch() recorded
    first, and be able to kill it."""
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    spec = make_spec(box_dir, kernel=kit.kernel, initrd=kit.initrd,
                     root_image=kit.root_image, cmdline=kit.cmdline, box_id="lvtcut")
    backend = LibvirtBackend(libvirt_uri)
    handle = backend.launch(backend.plan(spec))
    try:
        vm_file = box_dir / "vm.json"
        # what launch() leaves when it dies right after createXML: only the domain's name
        vm_file.write_text(json.dumps({"backend": "libvirt", "uri": libvirt_uri,
                                       "name": handle.name, "uuid": None}))
        adopted = LibvirtBackend(libvirt_uri).attach(box_dir)
        assert adopted is not None, "a running domain named in the box dir was not found"
        assert adopted.uuid == handle.uuid and adopted.is_running()
        assert json.loads(vm_file.read_text())["uuid"] == handle.uuid  # full record again
        adopted.kill()
        assert not handle.is_running()
        vm_file.write_text(json.dumps({"backend": "libvirt", "uri": libvirt_uri,
                                       "name": handle.name, "uuid": None}))
        assert LibvirtBackend(libvirt_uri).attach(box_dir) is None  # gone: nothing to adopt
    finally:
        _cleanup(handle)
