"""Auto-idmap (squash) for the C virtiofsd: the daemon runs in a user namespace that maps only
ns root to the host directory's owner, and its id switches and chowns do nothing, so every
file the guest writes belongs to that owner on the host and host root is out of reach."""

from __future__ import annotations

import errno
import os
import secrets
import threading
from pathlib import Path

import pytest

from boxlite_core import tools
from boxlite_core.errors import ConfigError, EngineError
from boxlite_core.models import BoxOptions, HostShare
from boxlite_core.volumes.virtiofs import (
    VirtiofsdInfo,
    VirtiofsSharer,
    detect_virtiofsd,
    idmap_lines,
    needs_idmap,
)
from boxlite_core.volumes.virtiofsd_launcher import EXPOSED_SOURCE

VIRTIOFSD = tools.find_tool("virtiofsd")
ROOT = os.geteuid() == 0
needs_c_virtiofsd = pytest.mark.skipif(
    VIRTIOFSD is None or not ROOT or detect_virtiofsd(VIRTIOFSD).flavour != "c",
    reason="needs QEMU's C virtiofsd and root",
)
OWNER = 1234
FULL = 4294967295  # ids 0 .. 2**32-2


def _parse(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in line.split()) for line in text.splitlines()]  # type: ignore[misc]


def _translate(lines: list[tuple[int, int, int]], inner: int) -> int | None:
    for first, lower, count in lines:
        if first <= inner < first + count:
            return lower + inner - first
    return None


@pytest.mark.parametrize("owner", [0, 1, 1000, 65535, 65536, 100000, FULL - 1])
def test_map_squashes_to_the_owner_and_maps_nothing_else(owner: int) -> None:
    lines = _parse(idmap_lines(owner))
    assert lines == [(0, owner, 1)]
    assert _translate(lines, 0) == owner  # the daemon (ns root) writes as the owner
    for other in {1, 999, 1000, 65534, 65535, FULL - 1} - {0}:
        assert _translate(lines, other) is None  # unreachable, host root above all


def test_map_refuses_unmappable_ids() -> None:
    for bad in (-1, FULL):
        with pytest.raises(ConfigError):
            idmap_lines(bad)


def test_squash_for_the_c_daemon_as_root_whenever_the_owner_is_known(tmp_path: Path) -> None:
    c = VirtiofsdInfo("/x", "c", False, False)
    rust = VirtiofsdInfo("/x", "rust", True, True)
    owned = HostShare("v", tmp_path, False, 1000, 1000)
    assert needs_idmap(c, owned, 0)
    assert not needs_idmap(c, owned, 1000)  # not root: cannot write arbitrary maps
    assert not needs_idmap(rust, owned, 0)  # Rust virtiofsd translates ids itself
    assert needs_idmap(c, HostShare("v", tmp_path, False, 0, 0), 0)  # root's: squash to root
    assert not needs_idmap(c, HostShare("v", tmp_path, False), 0)  # a rootfs share


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@needs_c_virtiofsd
def test_virtiofsd_runs_in_the_mapped_user_namespace(tmp_path: Path) -> None:
    box, rw, ro, plain = (tmp_path / n for n in ("box", "rw", "ro", "plain"))
    for d in (box, rw, ro, plain):
        d.mkdir()  # under pytest's 0700 tmp dir: the squashed daemon reaches it anyway
    (ro / "keep.txt").write_text("original\n")
    for d in (rw, ro):
        os.chown(d, OWNER, OWNER + 1)
    sharer = VirtiofsSharer()
    sharer.start(
        [
            HostShare("rw", rw, False, OWNER, OWNER + 1),
            HostShare("ro", ro, True, OWNER, OWNER + 1),
            HostShare("plain", plain, False),
        ],
        box,
    )
    try:
        records = {r["tag"]: r for r in sharer.read_state(box)}
        for tag in ("rw", "ro"):
            pid = records[tag]["pid"]
            assert records[tag]["idmap"] == {"uid": OWNER, "gid": OWNER + 1}
            assert _parse(Path(f"/proc/{pid}/uid_map").read_text()) == _parse(idmap_lines(OWNER))
            assert _parse(Path(f"/proc/{pid}/gid_map").read_text()) == _parse(
                idmap_lines(OWNER + 1)
            )
            assert _ns(pid, "user") != _ns(os.getpid(), "user")
            status = Path(f"/proc/{pid}/status").read_text()
            # host view: the daemon runs as the owner; it is root inside its namespace, with
            # the no-privilege and squash seccomp filters stacked (virtiofsd adds its own
            # once QEMU connects)
            assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
            assert f"Uid:\t{OWNER}\t{OWNER}\t{OWNER}\t{OWNER}" in status
            assert f"Gid:\t{OWNER + 1}\t{OWNER + 1}" in status
            assert int(status.split("CapEff:\t")[1].split()[0], 16) != 0
        plain_pid = records["plain"]["pid"]  # a rootfs share: no owner, no namespace
        assert records["plain"]["idmap"] is None
        assert _ns(plain_pid, "user") == _ns(os.getpid(), "user")
        assert "Seccomp:\t2" in Path(f"/proc/{plain_pid}/status").read_text()

        # read-only still holds with the user namespace: the daemon's view refuses writes
        view = Path(f"/proc/{records['ro']['pid']}/root") / EXPOSED_SOURCE.lstrip("/")
        assert (view / "keep.txt").read_text() == "original\n"
        with pytest.raises(OSError) as err:
            (view / "new.txt").write_text("x")
        assert err.value.errno == errno.EROFS
        assert records["ro"]["read_only_enforced_by"] == "ro-bind-mount"
    finally:
        sharer.stop(box)


@needs_c_virtiofsd
def test_idmapped_read_only_share_starts_while_grpc_threads_run(tmp_path: Path) -> None:
    """The runtime talks gRPC to its boxes while it starts the next one's daemons. grpcio's
    fork handlers restart its threads in a forked child, and the kernel refuses a user
    namespace to a multithreaded process: a ``preexec_fn`` setup failed with
    ``unshare(CLONE_NEWUSER): Invalid argument`` in exactly this state."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    box, ro = tmp_path / "box", tmp_path / "ro"
    for d in (box, ro):
        d.mkdir()
    (ro / "keep.txt").write_text("original\n")
    os.chown(ro, OWNER, OWNER)
    sharer = VirtiofsSharer()
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        assert threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1
        sharer.start([HostShare("ro", ro, True, OWNER, OWNER)], box)
        (record,) = sharer.read_state(box)
        pid = record["pid"]
        assert _parse(Path(f"/proc/{pid}/uid_map").read_text()) == _parse(idmap_lines(OWNER))
        view = Path(f"/proc/{pid}/root") / EXPOSED_SOURCE.lstrip("/")
        assert (view / "keep.txt").read_text() == "original\n"
        with pytest.raises(OSError) as err:
            (view / "new.txt").write_text("x")
        assert err.value.errno == errno.EROFS
    finally:
        sharer.stop(box)
        channel.close()
        server.stop(None)


@pytest.mark.skipif(not ROOT, reason="mount namespaces need root")
def test_a_launcher_failure_names_its_cause_in_the_daemon_log(tmp_path: Path) -> None:
    """A share that cannot be prepared fails the start with the launcher's reason, not a bare
    exit status."""
    info = VirtiofsdInfo("/bin/true", "c", False, False)
    share = HostShare("gone", tmp_path / "missing", True, 0, 0)
    sharer = VirtiofsSharer()
    with pytest.raises(EngineError) as err:
        sharer._start_one(info, share, tmp_path)
    text = str(err.value)
    assert "exited with 126" in text
    assert "boxlite: preparing virtiofsd's namespaces" in text
    assert "missing" in text


@pytest.mark.vm
@needs_c_virtiofsd
def test_guest_writes_land_as_the_owner_end_to_end(tmp_path: Path) -> None:
    from boxlite_core.runtime.runtime import Runtime

    home = Path(os.environ.get("BOXLITE_TEST_HOME") or "/var/tmp/boxlite-test-home")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    for d in (rw, ro):
        d.mkdir()
        os.chown(d, OWNER, OWNER)
    (rw / "host.txt").write_text("from host\n")
    os.chown(rw / "host.txt", OWNER, OWNER)
    (rw / "other.txt").write_text("other\n")
    os.chown(rw / "other.txt", 1000, 1000)
    (rw / "other.txt").chmod(0o644)
    (ro / "keep.txt").write_text("original\n")
    with Runtime(home) as rt:
        if "virtiofs" not in rt.plugins.sharer_names():
            pytest.skip("the virtiofs volume sharer is not registered")
        box = rt.create(
            BoxOptions(
                image="busybox",
                name=f"idmap-{secrets.token_hex(3)}",
                memory_mib=256,
                volumes=[f"{rw}:/data", f"{ro}:/ro:ro"],
                volume_sharer="virtiofs",
            )
        )
        try:
            box.start()
            made = box.exec([
                "sh", "-c",
                "echo hi > /data/f && mkdir /data/d && echo x > /data/g && chown 1000:1000 /data/g",
            ])
            assert made.ok, made.stderr
            for name in ("f", "d", "g"):  # a guest chown is accepted and squashed
                st = os.stat(rw / name)
                assert (st.st_uid, st.st_gid) == (OWNER, OWNER), name
            # the owner's files are root's in the guest; any other host id is unmapped
            listing = box.exec(["stat", "-c", "%n %u %g", "/data/host.txt", "/data/other.txt"])
            assert listing.text.split("\n")[:2] == [
                "/data/host.txt 0 0",
                "/data/other.txt 65534 65534",
            ]
            assert box.exec(["cat", "/data/other.txt"]).text == "other\n"
            # the daemon (and its pid/mount/net sandbox child) runs in the mapped namespace
            for record in VirtiofsSharer.read_state(rt.box_dir(box.id)):
                pid = record["pid"]
                assert _parse(Path(f"/proc/{pid}/uid_map").read_text()) == _parse(
                    idmap_lines(OWNER)
                )
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                assert kids, "virtiofsd's sandbox child is missing (QEMU is connected)"
                assert _ns(int(kids[0]), "user") == _ns(pid, "user")
                assert _ns(int(kids[0]), "pid") != _ns(pid, "pid")
            bad = box.exec(["sh", "-c", "echo x > /ro/new.txt"])
            assert bad.exit_code != 0
            assert not (ro / "new.txt").exists()
        finally:
            box.stop()
            box.remove(force=True)
