"""Issue 17 items 5 and 6 against the real agent (run natively, chrooting into a busybox
root): a missing working directory is created, owned by the exec's user; a volume whose
guest path goes through a symlink in the image mounts where the link leads, inside the root.
The same in a VM: tests/vm/test_exec_paths_vm.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxlite_core.channel.client import AgentClient
from boxlite_core.errors import GuestError
from boxlite_testing.native_agent import build_busybox_root


@pytest.fixture
def linked_root(tmp_path_factory, busybox_root) -> Path:
    """A busybox root of this test's own with the links real images have: /var/run -> /run
    (absolute), /var/lock -> ../run/lock (relative); plus /kern -> /proc, /top -> /,
    /pw -> /etc/passwd and a cycle /loop -> /loop."""
    root = build_busybox_root(tmp_path_factory.mktemp("linked") / "root")
    (root / "run/lock").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var/run").symlink_to("/run")
    (root / "var/lock").symlink_to("../run/lock")
    (root / "kern").symlink_to("/proc")
    (root / "top").symlink_to("/")
    (root / "pw").symlink_to("/etc/passwd")
    (root / "loop").symlink_to("/loop")
    return root


def _client(agent_factory, root: Path, volumes=()) -> AgentClient:
    agent = agent_factory()
    client = AgentClient.connect(agent.box_dir, timeout=30, is_alive=agent.is_alive,
                                 console_tail=agent.console_tail)
    client.init({"share": {"tag": str(root), "fstype": "bind"}, "volumes": list(volumes)})
    return client


def _volume(host: Path, guest: str) -> dict:
    return {"tag": str(host), "fstype": "bind", "guest_path": guest}


# -- working directory (item 5) ---------------------------------------------------------------


def test_a_missing_working_directory_is_created_for_the_user(agent_factory, linked_root):
    with _client(agent_factory, linked_root) as c:
        code, _sig, _to, out, err = c.run(["sh", "-c", "pwd; touch mine"], cwd="/work/a/b",
                                          user="app")
        assert code == 0, err
        assert out == b"/work/a/b\n"
    made = linked_root / "work/a/b"
    assert (made.stat().st_uid, made.stat().st_gid) == (1000, 1000)  # the exec's user (podman)
    assert (made / "mine").stat().st_uid == 1000
    assert made.stat().st_mode & 0o777 == 0o755
    for parent in ("work", "work/a"):  # made on the way: root's, 0755 (runc's MkdirAll)
        st = (linked_root / parent).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)


def test_an_existing_working_directory_is_left_as_it_is(agent_factory, linked_root):
    with _client(agent_factory, linked_root) as c:
        assert c.run(["pwd"], cwd="/etc", user="app")[3] == b"/etc\n"
    assert (linked_root / "etc").stat().st_uid == 0


@pytest.mark.parametrize(("cwd", "lands"), [("/var/run/app", "run/app"),
                                             ("/var/lock/x/y", "run/lock/x/y")])
def test_a_working_directory_through_a_symlink(agent_factory, linked_root, cwd, lands):
    with _client(agent_factory, linked_root) as c:
        code, _sig, _to, out, err = c.run(["pwd", "-P"], cwd=cwd)
        assert code == 0, err
        assert out.decode().strip() == "/" + lands
    assert (linked_root / lands).is_dir()


@pytest.mark.parametrize(
    ("cwd", "message"),
    [
        ("/etc/passwd", "working directory '/etc/passwd': exists and is not a directory"),
        ("/pw", "working directory '/pw': exists and is not a directory (at /etc/passwd in"),
        ("/etc/passwd/sub", "exists and is not a directory (at /etc/passwd in the container)"),
        ("/loop/x", "working directory '/loop/x': more than 40 symbolic links"),
    ],
)
def test_a_working_directory_that_cannot_be_is_a_clear_error(agent_factory, linked_root, cwd,
                                                            message):
    with _client(agent_factory, linked_root) as c, pytest.raises(GuestError) as info:
        c.exec(["true"], cwd=cwd)
    assert message in str(info.value)
    assert (linked_root / "etc/passwd").is_file()


# -- volumes (item 6) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guest", "lands"),
    [("/var/run/app", "/run/app"), ("/var/lock/app", "/run/lock/app"),
     ("/top/srv/data", "/srv/data"), ("/var/run/../run/deep/er", "/run/deep/er")],
)
def test_a_volume_through_a_symlink_mounts_where_it_leads(agent_factory, linked_root, tmp_path,
                                                          guest, lands):
    host = tmp_path / "vol"
    host.mkdir()
    (host / "f").write_text("from host\n")
    with _client(agent_factory, linked_root, [_volume(host, guest)]) as c:
        assert c.run(["cat", f"{guest}/f"])[3] == b"from host\n"
        assert c.run(["cat", f"{lands}/f"])[3] == b"from host\n"
        root = c.probe()["container_root"]
        targets = {m["target"] for m in c.probe()["mounts"]}
        assert f"{root}{lands}" in targets
    assert not (linked_root / lands.lstrip("/") / "f").exists()  # the mount, not the image
    assert os.readlink(linked_root / "var/run") == "/run"


@pytest.mark.parametrize(
    ("guest", "message"),
    [
        ("/kern/sys", "volume guest path '/kern/sys' resolves to /proc/sys (through a symlink "
                      "in the image): /proc is reserved"),
        ("/top", "volume guest path '/top' resolves to the container's root (through a sym"),
        ("/pw", "volume guest path '/pw': exists and is not a directory (at /etc/passwd in"),
        ("/etc/passwd", "volume guest path '/etc/passwd': exists and is not a directory"),
        ("/loop", "volume guest path '/loop': more than 40 symbolic links"),
    ],
)
def test_a_volume_that_cannot_mount_there_fails_init_clearly(agent_factory, linked_root,
                                                             tmp_path, guest, message):
    host = tmp_path / "vol"
    host.mkdir()
    with pytest.raises(GuestError) as info:
        _client(agent_factory, linked_root, [_volume(host, guest)])
    assert message in str(info.value)
    assert list(host.iterdir()) == []
