"""`docker cp`'s SRC_PATH / DEST_PATH table, both directions (host -> box, box -> host).

The rules are the table in docker's ``docker container cp`` reference ("Assuming a path
separator of /, a first argument of SRC_PATH and second argument of DEST_PATH, the behavior
is as follows"), each row a case below, plus its neighbours (trailing ``/`` on SRC and DEST,
``SRC/.`` into a missing path, conflicts one level down, a missing parent, ``FILE/``).

Each case runs on the same box twice: SRC made on one side, DEST's prior state on the other,
one copy, then the whole area around DEST listed (path -> content) and compared with what
docker gives. ``native``: the real agent run natively (fast); ``vm``: a real VM box (TCG),
one for the module.
"""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path

import attrs
import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime
from boxlite_testing.cli import boxlite
from boxlite_testing.homes import unique

#: SRC's tree, made on the source side under SRC_ROOT: a file and a directory
SRC_FILES = {"f.txt": "file", "src/a.txt": "a", "src/sub/b.txt": "b"}
DIR = "/"  # listing value of a directory

NO_SUCH_DIR = "no such directory"
NOT_A_DIR = "not a directory"
DIR_ONTO = "cannot copy a directory onto"
IS_A_DIR = "is a directory; cannot replace it"
MISSING = "does not exist"


@attrs.frozen
class Case:
    """``src``: SRC as typed, under the source root; ``before``: the area around DEST on the
    destination side (path -> content, DIR for a directory); ``dest``: DEST as typed, under
    that area; ``after``: the area once copied, or ``error``: a regex of the refusal (the
    area then must be as ``before``)."""

    src: str
    before: dict[str, str]
    dest: str
    after: dict[str, str] | None = None
    error: str | None = None


KEEP = {"dst": DIR, "dst/keep": "keep"}
TREE = {"a.txt": "a", "sub": DIR, "sub/b.txt": "b"}


def under(prefix: str, tree: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}/{k}": v for k, v in tree.items()}


CASES = {
    # -- the table: SRC_PATH specifies a file
    "file-to-missing": Case("f.txt", {}, "dst", after={"dst": "file"}),
    "file-to-missing-slash": Case("f.txt", {}, "dst/", error=NO_SUCH_DIR),
    "file-to-file": Case("f.txt", {"dst": "old"}, "dst", after={"dst": "file"}),
    "file-to-dir": Case("f.txt", KEEP, "dst", after={**KEEP, "dst/f.txt": "file"}),
    # -- the table: SRC_PATH specifies a directory
    "dir-to-missing": Case("src", {}, "dst", after={"dst": DIR, **under("dst", TREE)}),
    "dir-to-file": Case("src", {"dst": "old"}, "dst", error=DIR_ONTO),
    "dir-to-dir": Case(
        "src", KEEP, "dst", after={**KEEP, "dst/src": DIR, **under("dst/src", TREE)}
    ),
    "dir-dot-to-dir": Case("src/.", KEEP, "dst", after={**KEEP, **under("dst", TREE)}),
    # -- neighbours
    "file-to-dir-slash": Case("f.txt", KEEP, "dst/", after={**KEEP, "dst/f.txt": "file"}),
    "file-to-file-slash": Case("f.txt", {"dst": "old"}, "dst/", error=NOT_A_DIR),
    "file-to-missing-dot": Case("f.txt", {}, "dst/.", error=MISSING),  # dst/.'s parent: dst
    "dir-to-missing-dot": Case("src", {}, "dst/.", error=MISSING),
    "file-onto-dir-inside": Case("f.txt", {**KEEP, "dst/f.txt": DIR}, "dst", error=IS_A_DIR),
    "dir-to-missing-slash": Case("src", {}, "dst/", after={"dst": DIR, **under("dst", TREE)}),
    "dir-slash-to-dir": Case(
        "src/", KEEP, "dst", after={**KEEP, "dst/src": DIR, **under("dst/src", TREE)}
    ),
    "dir-slash-to-missing": Case("src/", {}, "dst", after={"dst": DIR, **under("dst", TREE)}),
    "dir-dot-to-missing": Case("src/.", {}, "dst", after={"dst": DIR, **under("dst", TREE)}),
    "dir-dot-to-dir-dot": Case("src/.", KEEP, "dst/.", after={**KEEP, **under("dst", TREE)}),
    "dir-dot-to-file": Case("src/.", {"dst": "old"}, "dst", error=DIR_ONTO),
    "dir-to-dir-onto-file-inside": Case("src", {**KEEP, "dst/src": "old"}, "dst", error=DIR_ONTO),
    "dir-dot-merges": Case(
        "src/.",
        {**KEEP, "dst/sub": DIR, "dst/sub/old.txt": "old", "dst/a.txt": "stale"},
        "dst",
        after={**KEEP, "dst/sub/old.txt": "old", **under("dst", TREE)},
    ),
    "dir-to-dir-deep-conflict": Case(
        "src",
        {**KEEP, "dst/src": DIR, "dst/src/sub": DIR, "dst/src/sub/b.txt": DIR},
        "dst",
        error=IS_A_DIR,
    ),
    "dir-dot-onto-file-inside": Case("src/.", {**KEEP, "dst/sub": "old"}, "dst", error=DIR_ONTO),
    "file-slash": Case("f.txt/", KEEP, "dst", error=NOT_A_DIR),
    "file-dot": Case("f.txt/.", KEEP, "dst", error=NOT_A_DIR),
    "missing-parent": Case("f.txt", {}, "nope/dst", error=MISSING),
    "dir-missing-parent": Case("src", {}, "nope/dst", error=MISSING),
    "missing-src": Case("nothing", KEEP, "dst", error=MISSING),
}


def host_make(root: Path, tree: dict[str, str]) -> None:
    root.mkdir(parents=True)
    for rel, content in tree.items():
        path = root / rel
        if content == DIR:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


def host_list(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = DIR if path.is_dir() else path.read_text()
    return out


def guest_make_script(root: str, tree: dict[str, str]) -> str:
    lines = [f"mkdir -p {shlex.quote(root)}"]
    for rel, content in tree.items():
        path = shlex.quote(f"{root}/{rel}")
        if content == DIR:
            lines.append(f"mkdir -p {path}")
        else:
            lines.append(f"mkdir -p $(dirname {path}) && printf %s {shlex.quote(content)} > {path}")
    return " && ".join(lines)


#: one line per entry under the current directory: "D path" or "F path content"
LIST = (
    'find . -mindepth 1 | sort | while read -r p; do if [ -d "$p" ]; then echo "D ${p#./}"; '
    'else echo "F ${p#./} $(cat "$p")"; fi; done'
)


def sh(box, script: str) -> str:
    """Run ``script`` in the box; its stdout. Through the agent client, not Box.exec: the
    native box has no image record to take exec defaults from."""
    code, _signal, _timed_out, out, err = box._live_client().run(["sh", "-c", script])
    assert code == 0, err.decode(errors="replace")
    return out.decode()


def guest_list(box, root: str) -> dict[str, str]:
    out = {}
    for line in sh(box, f"cd {shlex.quote(root)} && {LIST}").splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "D":
            out[rest] = DIR
        else:
            rel, _, content = rest.partition(" ")
            out[rel] = content
    return out


@pytest.fixture(scope="module", params=["native", pytest.param("vm", marks=pytest.mark.vm)])
def box(request):
    """The real agent natively, or one booted busybox VM box for the whole module."""
    if request.param == "native":
        yield request.getfixturevalue("native_box")
        return
    with Runtime(request.getfixturevalue("shared_home")) as rt:
        vm = rt.create(BoxOptions(image="busybox", name=unique("cprules"), memory_mib=256))
        try:
            vm.start()
            yield vm
        finally:
            rt.remove(vm.id, force=True)


@pytest.mark.parametrize("direction", ["in", "out"])
@pytest.mark.parametrize("name", list(CASES))
def test_docker_cp_table(box, direction, name, tmp_path):
    case = CASES[name]
    tag = f"{name}-{direction}-{secrets.token_hex(3)}"
    guest_area = f"/srv/cp/{tag}"
    if direction == "in":
        host_make(tmp_path / "s", SRC_FILES)
        sh(box, guest_make_script(guest_area, case.before))
        src, dest = f"{tmp_path}/s/{case.src}", f"{guest_area}/{case.dest}"

        def copy() -> None:
            box.copy_in(src, dest)

        def listing() -> dict[str, str]:
            return guest_list(box, guest_area)
    else:
        sh(box, guest_make_script(f"{guest_area}-s", SRC_FILES))
        area = tmp_path / "d"
        host_make(area, case.before)
        src, dest = f"{guest_area}-s/{case.src}", f"{area}/{case.dest}"

        def copy() -> None:
            box.copy_out(src, dest)

        def listing() -> dict[str, str]:
            return host_list(area)

    if case.error is not None:
        with pytest.raises(ConfigError, match=case.error):
            copy()
        assert listing() == case.before, "a refused copy changed the destination"
    else:
        copy()
        assert listing() == case.after


def test_copy_in_follows_links_at_dest_like_docker(box, tmp_path):
    """docker resolves DEST in the container with its symlinks followed: a link to a
    directory receives the copy inside its target; a dangling link names the file made at
    its target; a symlinked parent (``/var/run -> /run``) is gone through."""
    area = f"/srv/cp/links-{secrets.token_hex(3)}"
    sh(
        box,
        f"mkdir -p {area}/real {area}/run && ln -s real {area}/todir && "
        f"ln -s {area}/made {area}/dangling && ln -s run {area}/varrun",
    )
    src = tmp_path / "f.txt"
    src.write_text("file")
    box.copy_in(src, f"{area}/todir")
    box.copy_in(src, f"{area}/dangling")
    box.copy_in(src, f"{area}/varrun/app.txt")
    got = guest_list(box, area)  # find lists the links themselves, `[ -d ]` follows them
    assert got == {
        "real": DIR,
        "real/f.txt": "file",
        "todir": DIR,
        "made": "file",
        "dangling": "file",
        "run": DIR,
        "run/app.txt": "file",
        "varrun": DIR,
    }


def test_copy_in_of_links_and_ownership(box, tmp_path):
    """A host symlink is copied as the link; ``LINK/`` copies what it points at (as SRC,
    so into an existing directory under the link's name); the files belong to the
    container's root whoever owns them on the host (docker cp without -a)."""
    area = f"/srv/cp/hostlinks-{secrets.token_hex(3)}"
    sh(box, f"mkdir -p {area}/into")
    host_make(tmp_path / "s", SRC_FILES)
    for path in (tmp_path / "s").rglob("*"):
        os.chown(path, 4321, 4321)
    (tmp_path / "s" / "ln").symlink_to("src")
    box.copy_in(tmp_path / "s" / "ln", f"{area}/")
    box.copy_in(f"{tmp_path}/s/ln/", f"{area}/followed")
    box.copy_in(f"{tmp_path}/s/ln/", f"{area}/into")
    got = sh(
        box,
        f"cd {area} && readlink ln; stat -c %u:%g followed/a.txt into/ln "
        f"into/ln/sub/b.txt; cat followed/sub/b.txt into/ln/a.txt",
    )
    assert got.split() == ["src", "0:0", "0:0", "0:0", "ba"]


def test_copy_in_contents_of_cwd(box, tmp_path, monkeypatch):
    """``boxlite cp . BOX:/dir`` copies the current directory's contents (docker: "." is
    SRC/.), not a directory named after it."""
    host_make(tmp_path / "here", {"x.txt": "x"})
    monkeypatch.chdir(tmp_path / "here")
    area = f"/srv/cp/cwd-{secrets.token_hex(3)}"
    sh(box, f"mkdir -p {area}")
    box.copy_in(".", area)
    assert guest_list(box, area) == {"x.txt": "x"}


def test_copy_in_manifest_over_one_message(native_box, tmp_path):
    """A tree whose member list is over 1 MiB (5 500 names of 200 bytes): the manifest is
    split over several messages before the data, and a conflict at its very end is still
    found before anything is written. Native agent only (5 500 files under TCG: minutes)."""
    src = tmp_path / "many"
    src.mkdir()
    names = [f"{i:05d}-{'n' * 194}" for i in range(5500)]
    for name in names:
        (src / name).touch()
    area = f"/srv/cp/manifest-{secrets.token_hex(3)}"
    sh(native_box, f"mkdir -p {area}/many/{names[-1]}")  # a directory where the last file goes
    with pytest.raises(ConfigError, match=IS_A_DIR):
        native_box.copy_in(src, f"{area}/")
    assert sh(native_box, f"ls {area}/many | wc -l").strip() == "1"
    sh(native_box, f"rmdir {area}/many/{names[-1]}")
    native_box.copy_in(src, f"{area}/")
    assert sh(native_box, f"ls {area}/many | wc -l").strip() == "5500"


@pytest.mark.vm
def test_boxlite_cp_cli_follows_the_rules(box, request, tmp_path):
    """`boxlite cp` itself, both ways, on the VM box: SRC/. copies contents, a file to a
    missing DEST/ is one error line (exit 2) naming the path, and nothing is written."""
    if request.node.callspec.params["box"] != "vm":
        pytest.skip("the CLI needs a box in a runtime home (the VM box)")
    home = request.getfixturevalue("shared_home")
    name = box.name
    host_make(tmp_path / "s", SRC_FILES)
    area = f"/srv/cp/cli-{secrets.token_hex(3)}"
    sh(box, f"mkdir -p {area}/into")
    got = boxlite("cp", f"{tmp_path}/s/src/.", f"{name}:{area}/into", home=home)
    assert got.returncode == 0, got.stderr
    assert guest_list(box, f"{area}/into") == TREE
    got = boxlite("cp", f"{tmp_path}/s/f.txt", f"{name}:{area}/nodir/", home=home)
    assert got.returncode == 2 and "no such directory" in got.stderr, got.stderr
    assert len(got.stderr.strip().splitlines()) == 1, got.stderr
    out = tmp_path / "out"
    out.mkdir()
    got = boxlite("cp", f"{name}:{area}/into/.", str(out / "new"), home=home)
    assert got.returncode == 0, got.stderr
    assert host_list(out / "new") == TREE
    got = boxlite("cp", f"{name}:{area}/into", str(tmp_path / "s" / "f.txt"), home=home)
    assert got.returncode == 2 and "cannot copy a directory onto" in got.stderr, got.stderr
    assert (tmp_path / "s" / "f.txt").read_text() == "file"
    assert sh(box, f"ls {area}") == "into\n"
