"""The libvirt backend saves and restores a VM's state (``Capability.SNAPSHOT``, issue 14).

The VM tests boot ONE domain (box A) and do everything else by saving and restoring:
A saved with a disk switch and resumed; a new box B restored from that state with another
rootfs disk; A saved again and left paused; a corrupt image refused. Timings are printed
(run with ``-s`` to see them). The pure tests (header rewrite, plans, refusals) need no daemon.

Skipped (with the reason) when libvirtd is not reachable; CI starts it (scripts/start-services).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest

from boxlite_core.channel.client import AgentClient
from boxlite_core.channel.transport import INPROC
from boxlite_core.errors import EngineError, UnsupportedError
from boxlite_core.kit import ROOT_SERIAL, GuestKit
from boxlite_core.tools import require_tool
from boxlite_core.vmm.consolelog import writer_running
from boxlite_core.vmm.spec import (
    AgentChannel,
    Capability,
    ChannelKind,
    DiskSpec,
    DiskSwitch,
    GuestHints,
    ShareSpec,
    VmSpec,
)
from boxlite_qemu.libvirt_backend import (
    PRIVATE_IMAGE,
    SAVE_FILE,
    SAVE_MARKER,
    STATE_INFO,
    VM_FILE,
    LibvirtBackend,
    LibvirtHandle,
    save_bound,
    save_in_progress,
)
from boxlite_qemu.libvirt_xml import (
    SAVE_HEADER,
    SAVE_MAGIC,
    SaveImageError,
    build_domain_xml,
    rebrand_save_header,
    save_data_length,
    with_uuid,
)
from boxlite_testing.native_agent import build_busybox_root

ROOTFS = "bxrootfs"
DISK_SIZE = "64M"
INIT = {"disk": {"serial": ROOTFS, "fstype": "ext4", "read_only": False}, "hostname": "lvsnap"}


# -- pure: no daemon, no VM ------------------------------------------------------------------


def _image_head(xml: str, cookie: str = "<cookie/>", pad: int = 4096) -> bytes:
    body = xml.encode() + b"\0" + cookie.encode() + b"\0"
    data_len = len(body) + pad
    header = SAVE_HEADER.pack(SAVE_MAGIC, 2, data_len, 1, 0, len(xml) + 1, b"\0" * 56)
    return header + body + b"\0" * pad


def test_rebrand_renames_the_embedded_domain_in_place() -> None:
    xml = ("<domain type='qemu'>\n  <name>boxlite-aaa</name>\n  <uuid>"
           "11111111-2222-3333-4444-555555555555</uuid>\n  <devices/>\n</domain>\n")
    head = _image_head(xml)
    new = rebrand_save_header(head, "boxlite-a-much-longer-name",
                              "99999999-8888-7777-6666-555555555555")
    assert len(new) == len(head) == save_data_length(new)
    _magic, _ver, _data_len, running, _comp, cookie_at, _u = SAVE_HEADER.unpack(
        new[:SAVE_HEADER.size])
    data = new[SAVE_HEADER.size:]
    text = data[:cookie_at].rstrip(b"\0").decode()
    assert "<name>boxlite-a-much-longer-name</name>" in text
    assert "<uuid>99999999-8888-7777-6666-555555555555</uuid>" in text
    assert "boxlite-aaa" not in text and running == 1
    assert data[cookie_at:].split(b"\0", 1)[0] == b"<cookie/>"


@pytest.mark.parametrize("head, why", [
    (b"short", "shorter"),
    (b"LibvirtQemudPart" + b"\0" * 80, "not finished"),
    (b"NotLibvirtAtAll!" + b"\0" * 80, "magic"),
    (SAVE_HEADER.pack(SAVE_MAGIC, 3, 10, 0, 0, 5, b"\0" * 56), "version 3"),
])
def test_a_foreign_or_partial_header_is_refused(head: bytes, why: str) -> None:
    with pytest.raises(SaveImageError, match=why):
        save_data_length(head)


def test_with_uuid_adds_one_uuid_after_the_name() -> None:
    xml = "<domain type='qemu'>\n  <name>boxlite-x</name>\n  <memory>1</memory>\n</domain>\n"
    out = with_uuid(with_uuid(xml, "u-1"), "u-2")
    assert out.count("<uuid>") == 1 and "<uuid>u-2</uuid>" in out
    assert out.index("<name>") < out.index("<uuid>") < out.index("<memory>")


def test_plan_restores_from_the_directory_and_refuses_what_cannot_migrate(
    tmp_path: Path, make_spec
) -> None:
    backend = LibvirtBackend("qemu:///system", domain_type="qemu", arch="x86_64")
    spec = make_spec(tmp_path / "box")
    assert Capability.SNAPSHOT in backend.capabilities()
    restoring = attrs.evolve(spec, restore_from=tmp_path / "state")
    plan = backend.plan(restoring)
    assert plan.data["restore_image"] == str(tmp_path / "state" / SAVE_FILE)
    assert plan.data["xml"] == backend.plan(spec).data["xml"]  # same domain, same bytes
    assert "restore_image" not in backend.plan(spec).data
    fs = attrs.evolve(restoring, shares=(ShareSpec("vol0", tmp_path, "virtiofs",
                                                   socket=tmp_path / "vfs.sock"),))
    with pytest.raises(UnsupportedError, match="virtiofs"):
        backend.plan(fs)
    with pytest.raises(UnsupportedError, match="vhost-user-fs"):
        backend.snapshot_compat(fs)
    remote = LibvirtBackend("qemu+ssh://host/system", domain_type="qemu", arch="x86_64")
    assert Capability.SNAPSHOT not in remote.capabilities()
    with pytest.raises(UnsupportedError, match="remote"):
        remote.plan(restoring)


def test_a_kvm_domain_has_a_migratable_host_cpu(tmp_path: Path, make_spec) -> None:
    """host-passthrough with migratable='off' exposes features QEMU cannot save (invtsc):
    every save would be refused. 'on' is the qemu backend's `-cpu host`."""
    xml = build_domain_xml(make_spec(tmp_path), domain_type="kvm")
    cpu = ET.fromstring(xml).find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert cpu.get("migratable") == "on"


def test_snapshot_compat_names_libvirt_qemu_and_machine(libvirt_uri: str, make_spec,
                                                        tmp_path: Path) -> None:
    backend = LibvirtBackend(libvirt_uri)
    compat = backend.snapshot_compat(make_spec(tmp_path))
    assert compat.startswith("libvirt=") and "qemu=/" in compat
    assert "machine=pc-q35-" in compat or "machine=virt" in compat
    assert compat == LibvirtBackend(libvirt_uri).snapshot_compat(make_spec(tmp_path / "b"))


# -- pure: a save seen from another handle, and a save cut short ---------------------------


def test_the_save_bound_grows_with_memory_and_the_timeout_variables() -> None:
    small, big = save_bound(512 << 20, {}), save_bound(8 << 30, {})
    assert 30 < small < 60 < big  # 30 s + the size at 20 MB/s: not a fixed 60 s
    assert save_bound(512 << 20, {"BOXLITE_LIBVIRT_TIMEOUT": "600"}) == 600
    assert save_bound(8 << 30, {"BOXLITE_LIBVIRT_TIMEOUT": "1"}) == big


def _marker(box_dir: Path, **fields: float) -> None:
    record = {"pid": os.getpid(), "started": time.time(), "seconds": 60.0, **fields}
    (box_dir / SAVE_MARKER).write_text(json.dumps(record))


def test_a_save_in_progress_needs_a_live_saver_within_its_bound(tmp_path: Path) -> None:
    assert not save_in_progress(tmp_path) and not save_in_progress(None)
    _marker(tmp_path)
    assert save_in_progress(tmp_path)
    _marker(tmp_path, started=time.time() - 61)  # older than its bound
    assert not save_in_progress(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _marker(tmp_path, pid=dead.pid)  # the saver was killed: its marker counts for nothing
    assert not save_in_progress(tmp_path)
    (tmp_path / SAVE_MARKER).write_text("{not json")
    assert not save_in_progress(tmp_path)


def test_a_missing_domain_is_running_while_its_box_is_being_saved(tmp_path: Path) -> None:
    handle = LibvirtHandle("qemu:///system", "boxlite-b0x1d", "u-1", 7, None, tmp_path)
    handle._domain = lambda: None  # between libvirt's save and the restore
    _marker(tmp_path)
    assert handle.is_running() and handle.exit_reason() is None
    (tmp_path / SAVE_MARKER).unlink()
    assert not handle.is_running()


def test_a_handle_follows_its_domain_to_the_id_of_the_restore(tmp_path: Path) -> None:
    handle = LibvirtHandle("qemu:///system", "boxlite-b0x1d", "u-1", 7, 100, tmp_path)
    (tmp_path / VM_FILE).write_text(json.dumps({"uuid": "u-1", "id": 9, "pid": 4242}))
    handle._follow(9)
    assert (handle.dom_id, handle.pid) == (9, 4242)


class _FakeConn:
    def __init__(self, restore_error: Exception) -> None:
        self.restore_error = restore_error

    def isAlive(self) -> bool:  # libvirt-python's names
        return True

    def restoreFlags(self, *_args: object) -> int:
        raise self.restore_error


def test_a_failed_restore_after_the_save_says_where_the_state_is(tmp_path: Path) -> None:
    libvirt = pytest.importorskip("libvirt")
    handle = LibvirtHandle("qemu:///system", "boxlite-b0x1d", "u-1", 7, None, tmp_path)
    handle._conn = _FakeConn(libvirt.libvirtError("cannot restore: out of memory"))
    image = tmp_path / "state" / SAVE_FILE
    with pytest.raises(EngineError, match=rf"out of memory.*state is in {image}"):
        handle._restore_self(image, "<domain/>", None, running=True)
    handle._conn = _FakeConn(OSError("socket closed"))
    with pytest.raises(EngineError, match=rf"state is in {image}"):
        handle._restore_self(image, "<domain/>", None, running=True)


def test_a_save_cut_short_restores_the_domain_the_save_ended(tmp_path: Path) -> None:
    """Ctrl-C / timeout: libvirt finished the save anyway and the domain is gone. The rescue
    restores it from the complete image; an incomplete one is left alone."""
    handle = LibvirtHandle("qemu:///system", "boxlite-b0x1d", "u-1", 7, None, tmp_path)
    handle._domain = lambda: None
    restored: list[Path] = []
    handle._restore_self = lambda image, *_a, **_k: restored.append(image)
    aborted: list[str] = []
    dom = SimpleNamespace(abortJob=lambda: aborted.append("abort"))
    image = tmp_path / SAVE_FILE
    image.write_bytes(_image_head("<domain/>") + b"qemu stream")
    handle._rescue_save(dom, image, "<domain/>", None, running=True, timeout=1.0)
    assert aborted == ["abort"] and restored == [image]
    image.write_bytes(b"LibvirtQemudPart" + _image_head("<domain/>")[16:])
    handle._rescue_save(dom, image, "<domain/>", None, running=True, timeout=1.0)
    assert restored == [image]


def test_a_save_cut_short_leaves_an_aborted_save_alone(tmp_path: Path) -> None:
    libvirt = pytest.importorskip("libvirt")
    handle = LibvirtHandle("qemu:///system", "boxlite-b0x1d", "u-1", 7, None, tmp_path)
    live = SimpleNamespace(jobInfo=lambda: [libvirt.VIR_DOMAIN_JOB_NONE])
    handle._domain = lambda: live
    handle._restore_self = lambda *_a, **_k: pytest.fail("restored a domain that runs")
    handle._rescue_save(SimpleNamespace(abortJob=lambda: 0), tmp_path / SAVE_FILE,
                        "<domain/>", None, running=True, timeout=1.0)


# -- real domains --------------------------------------------------------------------------


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _ext4(path: Path, marker: str, root_dir: Path) -> Path:
    """A 0444 raw ext4 of DISK_SIZE holding a busybox root and /marker."""
    (root_dir / "marker").write_text(marker + "\n")
    _run(require_tool("mkfs.ext4"), "-q", "-F", "-d", str(root_dir), str(path), DISK_SIZE)
    path.chmod(0o444)
    return path


def _overlay(path: Path, backing: Path, fmt: str) -> Path:
    _run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", fmt, "-b",
         str(backing), "-u", str(path), DISK_SIZE)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _connect(spec, handle: LibvirtHandle, timeout: float) -> AgentClient:
    return AgentClient.connect(
        spec.box_dir, kind=INPROC, socket_path=spec.agent.socket, timeout=timeout,
        is_alive=handle.is_running,
        console_tail=lambda: spec.console_log.read_text(errors="replace")[-3000:])


def _box_spec(kit: GuestKit, box_dir: Path, box_id: str, rootfs: Path) -> VmSpec:
    """The layout the runtime gives a box: guest root image, then the container rootfs."""
    return VmSpec(
        box_id=box_id, box_dir=box_dir, cpus=1, memory_mib=512, kernel=kit.kernel,
        initrd=kit.initrd, cmdline=kit.cmdline, console_log=box_dir / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box_dir / "agent.port"),
        disks=(DiskSpec(kit.root_image, "raw", read_only=True, serial=ROOT_SERIAL),
               DiskSpec(rootfs, "qcow2", serial=ROOTFS)),
        guest=GuestHints(machine=kit.machine),
    )


def _kill(handle: LibvirtHandle | None) -> None:
    if handle is not None:
        try:
            handle.kill()
        finally:
            handle.release()


@pytest.fixture(scope="module")
def lvs(kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Box A booted cold, its agent answering, then saved with its rootfs disk switched and
    resumed: the template directory every VM test here restores from."""
    libvirt = pytest.importorskip("libvirt")
    from boxlite_qemu.libvirt_backend import default_uri

    uri = default_uri()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd not reachable at {uri} ({exc}); scripts/start-services")
    # unix socket paths hold 107 bytes: pytest's tmp_path is too deep for BOXDIR/*.sock
    top = Path(tempfile.mkdtemp(prefix="lvs-", dir="/tmp"))
    images = tmp_path_factory.mktemp("images")
    ns = SimpleNamespace(top=top, uri=uri, kit=kit, handles=[],
                         backend=LibvirtBackend(uri), timings={})
    try:
        ns.base_one = _ext4(images / "one.ext4", "one", build_busybox_root(images / "r1"))
        ns.base_two = _ext4(images / "two.ext4", "two", build_busybox_root(images / "r2"))
        a_dir = top / "a"
        a_dir.mkdir()
        ns.a_rootfs = _overlay(a_dir / "rootfs.qcow2", ns.base_one, "raw")
        ns.a_spec = _box_spec(kit, a_dir, "lvsnapa", ns.a_rootfs)
        started = time.monotonic()
        ns.a = ns.backend.launch(ns.backend.plan(ns.a_spec))
        ns.handles.append(ns.a)
        _connect(ns.a_spec, ns.a, 180).close()
        ns.timings["cold_boot_to_ping"] = time.monotonic() - started
        # what the core does before a switch: keep the disk's content under another name
        # (a hard link: the VM's file stays the same inode) and make the overlay on it
        ns.frozen = a_dir / "rootfs.frozen.qcow2"
        os.link(ns.a_rootfs, ns.frozen)
        overlay = _overlay(a_dir / "rootfs.next.qcow2", ns.frozen, "qcow2")
        ns.template = top / "template"
        ns.template.mkdir()
        old_id = ns.a.dom_id
        started = time.monotonic()
        ns.a.save_state(ns.template, switch_disks=[DiskSwitch(ROOTFS, ns.a_rootfs, overlay)])
        ns.timings["save_state_resume"] = time.monotonic() - started
        ns.frozen_digest = _digest(ns.frozen)
        ns.old_id = old_id
        yield ns
    finally:
        for handle in ns.handles:
            _kill(handle)
        shutil.rmtree(top, ignore_errors=True)
        print("\nlibvirt snapshot timings (s):",
              json.dumps({k: round(v, 3) for k, v in ns.timings.items()}, sort_keys=True))


@pytest.mark.vm
def test_save_resumes_the_same_domain_on_the_switched_disk(lvs: SimpleNamespace) -> None:
    a, spec = lvs.a, lvs.a_spec
    assert a.is_running() and a.dom_id != lvs.old_id
    info = json.loads((lvs.template / STATE_INFO).read_text())
    assert info["resumed"] is True and info["image_bytes"] > 1 << 20
    lvs.timings["libvirt_save"] = info["save_seconds"]
    lvs.timings["libvirt_restore_self"] = info["restore_seconds"]
    assert sorted(p.name for p in lvs.template.iterdir()) == [SAVE_FILE, STATE_INFO]
    record = json.loads((spec.box_dir / "vm.json").read_text())
    assert (record["uuid"], record["id"]) == (a.uuid, a.dom_id)
    assert writer_running(spec.box_dir), "the console writer was not restarted"
    started = time.monotonic()
    client = _connect(spec, a, 60)
    lvs.timings["resumed_first_ping"] = time.monotonic() - started
    try:
        client.init(INIT)  # mounting writes the ext4: into the overlay, never the frozen file
        code, _sig, _to, out, err = client.run(["sh", "-c", "cat /marker; echo x > /w; sync"])
        assert code == 0, err
        assert out.decode().strip() == "one"
    finally:
        client.close()
    adopted = LibvirtBackend(lvs.uri).attach(spec.box_dir)  # a fresh process's view
    assert adopted is not None and adopted.dom_id == a.dom_id
    adopted.release()
    assert _digest(lvs.frozen) == lvs.frozen_digest, "the guest wrote the frozen disk"
    qemu_img = require_tool("qemu-img")
    chain = json.loads(_run(qemu_img, "info", "-U", "--output=json", str(lvs.a_rootfs)))
    assert Path(chain["backing-filename"]) == lvs.frozen  # the box's disk IS the overlay
    same = subprocess.run([qemu_img, "compare", "-U", "-q", str(lvs.frozen),
                           str(lvs.a_rootfs)], check=False)
    assert same.returncode == 1, "the guest's writes did not reach the overlay"


@pytest.mark.vm
def test_another_handle_sees_the_box_run_on_through_a_save(lvs: SimpleNamespace) -> None:
    """A handle attach()ed as another process would (its own connection) never sees the box
    gone while this one saves it (libvirt ends the domain for ~2-3 s), follows the restored
    domain's new ID, and reaches its agent afterwards."""
    spec = lvs.a_spec
    other = LibvirtBackend(lvs.uri).attach(spec.box_dir)
    assert other is not None and other.dom_id == lvs.a.dom_id
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(other.is_running())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    directory = lvs.top / "seen-by-other"
    directory.mkdir()
    old_id = lvs.a.dom_id
    try:
        lvs.a.save_state(directory)
    finally:
        done.set()
        watcher.join(60)
    try:
        assert len(seen) > 5 and all(seen), f"the other handle saw the VM gone: {seen}"
        assert not (spec.box_dir / SAVE_MARKER).exists()
        assert other.is_running() and other.exit_reason() is None
        assert other.dom_id == lvs.a.dom_id != old_id
        client = _connect(spec, other, 60)
        try:
            if not client.ping()["initialized"]:
                client.init(INIT)
            code, _sig, _to, out, err = client.run(["echo", "again"])
            assert (code, out.decode().strip()) == (0, "again"), err
        finally:
            client.close()
    finally:
        other.release()


@pytest.mark.vm
def test_a_save_cut_short_by_its_bound_leaves_the_domain_running(
    lvs: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The save times out (a 0.3 s bound; it takes ~2 s): the job is aborted, or the domain
    the save ended is restored; either way the box runs on and its agent answers."""
    from boxlite_qemu import libvirt_backend

    real, calls = libvirt_backend.save_bound, []

    def short_first(size: int, env: dict[str, str] | None = None) -> float:
        calls.append(size)
        return 0.3 if len(calls) == 1 else real(size, env)

    monkeypatch.setattr(libvirt_backend, "save_bound", short_first)
    directory = lvs.top / "cut-short"
    directory.mkdir()
    with pytest.raises(EngineError, match=r"virDomainSaveFlags .*did not answer in 0\.3 s"):
        lvs.a.save_state(directory)
    assert calls[0] == 512 << 20  # bounded by the guest's memory
    assert lvs.a.is_running(), lvs.a.exit_reason()
    assert not (lvs.a_spec.box_dir / SAVE_MARKER).exists()
    client = _connect(lvs.a_spec, lvs.a, 60)
    try:
        assert client.ping()["version"]
    finally:
        client.close()


@pytest.mark.vm
def test_a_new_box_restores_from_the_state_with_its_own_disk(lvs: SimpleNamespace) -> None:
    b_dir = lvs.top / "b"
    b_dir.mkdir()
    rootfs = _overlay(b_dir / "rootfs.qcow2", lvs.base_two, "raw")  # same size, other image
    spec = attrs.evolve(_box_spec(lvs.kit, b_dir, "lvsnapb", rootfs),
                        restore_from=lvs.template)
    backend = LibvirtBackend(lvs.uri)
    plan = backend.plan(spec)
    started = time.monotonic()
    b = backend.launch(plan)
    lvs.handles.append(b)
    lvs.timings["restore_new_box_launch"] = time.monotonic() - started
    assert b.is_running() and lvs.a.is_running()  # both at once: its own name and UUID
    assert b.name == "boxlite-lvsnapb" and b.uuid != lvs.a.uuid
    assert not (b_dir / PRIVATE_IMAGE).exists()
    client = _connect(spec, b, 60)
    lvs.timings["restore_new_box_first_ping"] = time.monotonic() - started
    try:
        reply = client.ping()
        assert reply["initialized"] is False  # the saved agent, before Init, as saved
        client.init(INIT)
        code, _sig, _to, out, err = client.run(["cat", "/marker"])
        lvs.timings["restore_new_box_first_exec"] = time.monotonic() - started
        assert code == 0, err
        assert out.decode().strip() == "two", "the restored box read the template's disk"
    finally:
        client.close()
    _kill(b)
    assert not b.is_running()


@pytest.mark.vm
def test_save_without_resume_leaves_the_domain_paused(lvs: SimpleNamespace) -> None:
    libvirt = pytest.importorskip("libvirt")
    directory = lvs.top / "paused"
    directory.mkdir()
    lvs.a.save_state(directory, resume=False)
    conn = libvirt.open(lvs.uri)
    try:
        state = conn.lookupByUUIDString(lvs.a.uuid).state()[0]
    finally:
        conn.close()
    assert state == libvirt.VIR_DOMAIN_PAUSED
    assert lvs.a.is_running()
    lvs.a.resume()
    client = _connect(lvs.a_spec, lvs.a, 60)
    try:
        assert client.ping()["version"]
    finally:
        client.close()


@pytest.mark.vm
def test_a_corrupt_image_is_an_engine_error_and_leaves_no_domain(
    lvs: SimpleNamespace
) -> None:
    libvirt = pytest.importorskip("libvirt")
    backend = LibvirtBackend(lvs.uri)
    for label, damage in (("truncated", "truncate"), ("garbage", "header")):
        state = lvs.top / f"bad-{label}"
        state.mkdir()
        image = state / SAVE_FILE
        shutil.copyfile(lvs.template / SAVE_FILE, image)
        if damage == "truncate":  # the QEMU stream ends half way
            with image.open("r+b") as fh:
                fh.truncate(image.stat().st_size // 2)
        else:
            with image.open("r+b") as fh:
                fh.write(struct.pack("=16s", b"NotLibvirtAtAll!"))
        box_dir = lvs.top / f"c-{label}"
        box_dir.mkdir()
        rootfs = _overlay(box_dir / "rootfs.qcow2", lvs.base_two, "raw")
        box_id = f"lvsbad{label[0]}"
        spec = attrs.evolve(_box_spec(lvs.kit, box_dir, box_id, rootfs),
                            restore_from=state)
        with pytest.raises(EngineError, match=r"boxlite-lvsbad|not a usable libvirt"):
            handle = backend.launch(backend.plan(spec))
            lvs.handles.append(handle)  # only if it wrongly succeeded: cleaned up
        conn = libvirt.open(lvs.uri)
        try:
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByName(f"boxlite-{box_id}")
        finally:
            conn.close()
        assert not (box_dir / PRIVATE_IMAGE).exists()
        assert not writer_running(box_dir)


@pytest.mark.vm
def test_a_mounted_9p_share_refuses_the_save_and_the_domain_runs_on(
    lvs: SimpleNamespace, tmp_path: Path
) -> None:
    """QEMU blocks migration while the guest has a 9p export mounted: UnsupportedError with
    QEMU's reason, and libvirt lets the domain run on untouched."""
    root = build_busybox_root(tmp_path / "root9p")
    box_dir = lvs.top / "ninep"
    box_dir.mkdir()
    spec = attrs.evolve(
        _box_spec(lvs.kit, box_dir, "lvsnap9p", _overlay(box_dir / "rootfs.qcow2",
                                                       lvs.base_two, "raw")),
        shares=(ShareSpec("rootfs9p", root, "9p"),),
    )
    backend = LibvirtBackend(lvs.uri)
    handle = backend.launch(backend.plan(spec))
    lvs.handles.append(handle)
    client = _connect(spec, handle, 180)
    try:
        client.init({"share": {"tag": "rootfs9p", "fstype": "9p"}, "hostname": "lvsnap9p"})
        directory = lvs.top / "ninep-state"
        directory.mkdir()
        dom_id = handle.dom_id
        with pytest.raises(UnsupportedError, match=r"(?i)migration|virtfs") as refused:
            handle.save_state(directory)
        print(f"\n9p save refused: {refused.value}")
        assert handle.is_running() and handle.dom_id == dom_id
        assert client.ping()["initialized"] is True  # the same connection still answers
    finally:
        client.close()
    _kill(handle)
