"""Issue 17 items 5 and 6: a container path resolved inside the container's root with
chroot semantics (agent/rootpath.py), as the agent does for volume targets and working
directories. Plain directories stand for a container root: no root privileges needed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from boxlite_core.agent.rootpath import MAXSYMLINKS, in_container, resolve


@pytest.fixture
def root(tmp_path) -> Path:
    """A container root: /run, /etc/passwd, /usr/lib; /var/run -> /run (absolute),
    /var/lock -> ../run/lock (relative), /lib -> usr/lib (relative, at the top)."""
    r = tmp_path / "root"
    for d in ("run", "etc", "usr/lib", "var"):
        (r / d).mkdir(parents=True)
    (r / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (r / "var/run").symlink_to("/run")
    (r / "var/lock").symlink_to("../run/lock")
    (r / "lib").symlink_to("usr/lib")
    return r


def _inside(root: Path, path: str, **kw) -> str:
    real, _created = resolve(str(root), path, **kw)
    return in_container(str(root), real)


def test_absolute_link_restarts_at_the_container_root(root):
    real, created = resolve(str(root), "/var/run/app", create=True)
    assert real == str(root / "run/app") and (root / "run/app").is_dir()
    assert created == [str(root / "run/app")]
    assert os.readlink(root / "var/run") == "/run"  # the link itself is left as it was


def test_relative_link_is_followed_from_its_directory(root):
    assert _inside(root, "/var/lock/app", create=True) == "/run/lock/app"
    assert (root / "run/lock/app").is_dir()
    assert _inside(root, "/lib") == "/usr/lib"


def test_a_chain_of_links(root):
    (root / "a").symlink_to("/b")
    (root / "b").symlink_to("c/d")  # relative, at the top
    (root / "c").mkdir()
    (root / "c/d").symlink_to("/var/run")  # and on into another link
    assert _inside(root, "/a/x", create=True) == "/run/x"


def test_dotdot_stops_at_the_root(root, tmp_path):
    (root / "up").symlink_to("../../../../../etc")
    assert _inside(root, "/up") == "/etc"
    assert _inside(root, "/../../../etc") == "/etc"
    assert _inside(root, "/run/../../var/run/..") == "/"


def test_an_absolute_link_never_reaches_the_host(root, tmp_path):
    """A link to a host path that exists (tmp_path) lands inside the root, created there."""
    (root / "escape").symlink_to(str(tmp_path / "outside"))
    real, _created = resolve(str(root), "/escape/x", create=True)
    assert real.startswith(str(root) + "/")
    assert not (tmp_path / "outside").exists()


def test_missing_components_are_created_nested_outermost_first(root):
    real, created = resolve(str(root), "/srv/a/b/c", create=True)
    assert created == [str(root / p) for p in ("srv", "srv/a", "srv/a/b", "srv/a/b/c")]
    assert {(root / p).stat().st_mode & 0o777 for p in ("srv", "srv/a/b/c")} <= {0o755}
    assert resolve(str(root), "/srv/a/b/c", create=True) == (real, [])  # nothing new


def test_missing_without_create_names_the_component(root):
    with pytest.raises(FileNotFoundError) as info:
        resolve(str(root), "/var/run/nope/deeper")
    assert info.value.filename == "/run/nope"


@pytest.mark.parametrize(
    ("path", "where"),
    [("/etc/passwd", "/etc/passwd"), ("/etc/passwd/x", "/etc/passwd"),
     ("/pw", "/etc/passwd"), ("/pw/x", "/etc/passwd")],
)
def test_a_file_or_a_link_to_one_is_not_a_directory(root, path, where):
    (root / "pw").symlink_to("etc/passwd")
    with pytest.raises(NotADirectoryError) as info:
        resolve(str(root), path, create=True)
    assert info.value.filename == where
    assert (root / "etc/passwd").is_file()  # nothing replaced


@pytest.mark.parametrize("links", [{"x": "x"}, {"a": "/b", "b": "a"}, {"a": "b/..", "b": "/a"}])
def test_a_link_cycle_is_eloop(root, links):
    for name, target in links.items():
        (root / name).symlink_to(target)
    with pytest.raises(OSError) as info:
        resolve(str(root), f"/{next(iter(links))}/y", create=True)
    assert info.value.errno == errno.ELOOP
    assert f"more than {MAXSYMLINKS} symbolic links" in info.value.strerror


def test_the_link_budget_is_linux_s(root):
    """40 links in a row resolve; the 41st is ELOOP (fs/namei.c MAXSYMLINKS)."""
    for i in range(MAXSYMLINKS + 1):
        (root / f"l{i}").symlink_to(f"/l{i + 1}")
    (root / f"l{MAXSYMLINKS + 1}").mkdir()
    assert _inside(root, "/l1") == f"/l{MAXSYMLINKS + 1}"
    with pytest.raises(OSError) as info:
        resolve(str(root), "/l0")
    assert info.value.errno == errno.ELOOP


def test_a_link_to_the_root_resolves_to_the_root(root):
    (root / "top").symlink_to("/")
    assert _inside(root, "/top") == "/"
    assert _inside(root, "/top/top/etc") == "/etc"
