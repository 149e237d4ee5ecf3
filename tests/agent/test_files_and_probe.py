"""Upload/Download tar streams confined to the container root; Probe facts."""

from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from boxlite_core.errors import GuestError


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def test_upload_download_round_trip(client, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    payload = os.urandom(2_500_000)
    (src / "big.bin").write_bytes(payload)
    (src / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "sub" / "run.sh", 0o755)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname="data")
    raw = buf.getvalue()
    client.upload_tar("/srv/in", [raw[i : i + 100_000] for i in range(0, len(raw), 100_000)])

    assert client.run(["/srv/in/data/sub/run.sh"])[3] == b"hi\n"
    back = b"".join(client.download_tar("/srv/in/data"))
    with tarfile.open(fileobj=io.BytesIO(back)) as tar:
        names = sorted(tar.getnames())
        assert names == ["data", "data/big.bin", "data/sub", "data/sub/run.sh"]
        assert tar.extractfile("data/big.bin").read() == payload
        assert tar.getmember("data/sub/run.sh").mode & 0o777 == 0o755


def test_download_single_file_and_missing_path(client):
    back = b"".join(client.download_tar("/etc/passwd"))
    with tarfile.open(fileobj=io.BytesIO(back)) as tar:
        assert tar.getnames() == ["passwd"]
        assert b"app:x:1000" in tar.extractfile("passwd").read()
    with pytest.raises(GuestError, match="/no/such"):
        b"".join(client.download_tar("/no/such"))


def test_download_symlink_path_sends_the_link(client):
    """`cp -a` / `docker cp` of a symlink path copies the link itself, dangling or not; a
    trailing "/" follows it; "/dir/." sends the contents under "."."""
    client.run(["sh", "-c", "mkdir -p /srv/l/d && echo hi > /srv/l/d/f && "
                "ln -sfn /no/such /srv/l/dangling && ln -sfn /srv/l/d /srv/l/todir"])
    for path, target in (("/srv/l/dangling", "/no/such"), ("/srv/l/todir", "/srv/l/d")):
        back = b"".join(client.download_tar(path))
        with tarfile.open(fileobj=io.BytesIO(back)) as tar:
            (member,) = tar.getmembers()
            assert member.issym() and member.linkname == target
            assert member.name == path.rsplit("/", 1)[1]
    back = b"".join(client.download_tar("/srv/l/todir/"))
    with tarfile.open(fileobj=io.BytesIO(back)) as tar:
        assert sorted(tar.getnames()) == ["todir", "todir/f"]
    back = b"".join(client.download_tar("/srv/l/d/."))
    with tarfile.open(fileobj=io.BytesIO(back)) as tar:
        assert sorted(m.name for m in tar.getmembers()) == [".", "./f"]


@pytest.mark.parametrize(
    "members",
    [
        [_file("/escape-abs", b"x")],
        [_file("../escape-dotdot", b"x")],
        [_file("ok/../../escape-nested", b"x")],
        [_symlink("link", "/"), _file("link/escape-through-symlink", b"x")],
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlinked-parent"],
)
def test_hostile_tar_rejected(client, busybox_root, members):
    with pytest.raises(GuestError, match="upload"):
        client.upload_tar("/srv/hostile", [_tar(members)])
    leaked = [p for p in busybox_root.rglob("escape-*")]
    assert leaked == []
    assert not any(p.name.startswith("escape-") for p in busybox_root.parent.iterdir())


def test_existing_symlink_is_replaced_not_followed(client, busybox_root):
    client.run(["sh", "-c", "mkdir -p /srv/s && ln -sf /etc/passwd /srv/s/target"])
    client.upload_tar("/srv/s", [_tar([_file("target", b"replaced\n")])])
    assert b"app:x:1000" in (busybox_root / "etc/passwd").read_bytes()
    assert client.run(["cat", "/srv/s/target"])[3] == b"replaced\n"


def test_probe(client):
    facts = client.probe(["/etc/passwd", "/home/app", "/missing"])
    assert facts["cpu_count"] == os.cpu_count()
    assert facts["mem_total_kb"] > 0
    assert facts["kernel_release"] == os.uname().release
    assert facts["hostname"] == "boxtest"
    root = facts["container_root"]
    targets = {m["target"]: m for m in facts["mounts"]}
    assert targets[f"{root}/tmp"]["fstype"] == "tmpfs"
    assert targets[f"{root}/dev/shm"]["fstype"] == "tmpfs"
    home = facts["stats"]["/home/app"]
    assert home["exists"] and (home["uid"], home["gid"]) == (1000, 1000)
    assert stat.S_ISDIR(home["mode"])
    assert facts["stats"]["/missing"]["exists"] is False
    assert facts["stats"]["/etc/passwd"]["mode"] & 0o777 == 0o644


def test_container_dev_is_minimal(client):
    out = client.run(["ls", "/dev"])[3].decode().split()
    assert {"null", "zero", "urandom", "pts", "shm"} <= set(out)
    assert not [name for name in out if name.startswith(("sd", "vd", "nvme", "loop"))]
    assert (
        client.run(["sh", "-c", "echo x > /dev/null && head -c 4 /dev/zero | wc -c"])[3].strip()
        == b"4"
    )
    # the usual devices, as nodes of their own (mknod, as runc makes them), not mounts: the
    # container's /dev has three mounts, whatever every exec copies into its namespace
    nodes = client.run(["sh", "-c", "for n in null zero full random urandom tty; do "
                        "stat -c '%n %t:%T %a' /dev/$n; done"])[3].decode().splitlines()
    assert nodes == ["/dev/null 1:3 666", "/dev/zero 1:5 666", "/dev/full 1:7 666",
                     "/dev/random 1:8 666", "/dev/urandom 1:9 666", "/dev/tty 5:0 666"]
    mounts = client.run(["cat", "/proc/self/mounts"])[3].decode().splitlines()
    assert sorted(m.split()[1] for m in mounts if m.split()[1].startswith("/dev")) == [
        "/dev", "/dev/pts", "/dev/shm"]
