"""Issue 17 items 5 and 6 in a real VM: a working directory missing from the image (its
WorkingDir, a call's cwd, `boxlite exec -w`) is created, the last directory the user's; a
volume whose guest path goes through a symlink in the image mounts where the link leads.

The image: busybox plus /run, /run/lock, /var/run -> /run, /var/lock -> ../run/lock,
/up -> ../../../run (climbs above the root), /pw -> /etc/passwd, /kern -> /proc, /loop ->
/loop; WorkingDir /srv/app (missing), User nobody. Every neighbour of the rule is also
checked against the real agent without a VM: tests/agent/test_exec_paths.py.
"""

from __future__ import annotations

import pytest

from boxlite_core.errors import BoxliteError, GuestError
from boxlite_core.models import BoxOptions, BoxStatus
from boxlite_core.tools import find_tool
from boxlite_testing.cli import boxlite
from boxlite_testing.derived import busybox_derived
from boxlite_testing.homes import unique
from boxlite_testing.oci import d, sym

pytestmark = pytest.mark.vm

NOBODY = 65534
#: guest path of each volume → where it lands in the container
VOLUMES = {"/var/run/app": "/run/app", "/var/lock/app": "/run/lock/app", "/up/x": "/run/x"}


@pytest.fixture(scope="module")
def linked_image(runtime, tmp_path_factory):
    entries = [
        d("run"), d("run/lock"), sym("var/run", "/run"), sym("var/lock", "../run/lock"),
        sym("up", "../../../run"), sym("pw", "/etc/passwd"), sym("kern", "/proc"),
        sym("loop", "/loop"),
    ]
    ref = busybox_derived(runtime.images, tmp_path_factory.mktemp("linked"), entries=entries,
                          config={"WorkingDir": "/srv/app", "User": "nobody"})
    yield ref
    runtime.images.remove(ref, in_use=runtime.images_in_use())  # untag; kept if in use


@pytest.fixture(scope="module")
def linked_box(runtime, linked_image, tmp_path_factory):
    host = tmp_path_factory.mktemp("vols")
    specs = []
    for index, guest in enumerate(VOLUMES):
        (host / str(index)).mkdir()
        (host / str(index) / "from-host").write_text(f"volume {index}\n")
        specs.append(f"{host / str(index)}:{guest}")
    box = runtime.create(BoxOptions(image=linked_image, name=unique("paths"), memory_mib=256,
                                    volumes=specs))
    box.start()
    yield box, host
    runtime.remove(box.id, force=True)


def _sh(box, script: str, **kw) -> str:
    result = box.exec(["sh", "-c", script], **kw)
    assert result.ok, result.stderr
    return result.text


def test_a_missing_image_workdir_is_created_for_the_image_user(linked_box):
    box, _host = linked_box
    assert _sh(box, "pwd; id -u; stat -c '%u %a' /srv/app; stat -c %u /srv") == (
        f"/srv/app\n{NOBODY}\n{NOBODY} 755\n0\n"
    )


@pytest.mark.parametrize(("cwd", "lands"), [("/a/b/c", "/a/b/c"), ("/var/run/w", "/run/w"),
                                             ("/var/lock/w/x", "/run/lock/w/x")])
def test_a_missing_cwd_is_created_through_links(linked_box, cwd, lands):
    box, _host = linked_box
    assert _sh(box, "pwd -P; stat -c %u .", cwd=cwd, user="root") == f"{lands}\n0\n"


@pytest.mark.parametrize(
    ("cwd", "message"),
    [("/etc/passwd", "working directory '/etc/passwd': exists and is not a directory"),
     ("/pw/x", "exists and is not a directory (at /etc/passwd in the container)"),
     ("/loop/x", "more than 40 symbolic links")],
)
def test_a_cwd_that_cannot_be_made_is_a_clear_error(linked_box, cwd, message):
    box, _host = linked_box
    with pytest.raises(GuestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        box.exec(["true"], cwd=cwd)


def test_cli_exec_w_creates_the_directory(linked_box, vm_home):
    box, _host = linked_box
    proc = boxlite("exec", "-w", "/cli/made", box.name, "--", "sh", "-c", "pwd; stat -c %u .",
                   home=vm_home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"/cli/made\n{NOBODY}\n"  # the image's user owns what was made


def test_volumes_through_links_mount_where_they_lead(linked_box):
    box, host = linked_box
    mounts = _sh(box, "cat /proc/self/mounts").splitlines()
    targets = {line.split()[1] for line in mounts}
    for index, (guest, lands) in enumerate(VOLUMES.items()):
        assert lands in targets, (guest, targets)
        assert _sh(box, f"cat {guest}/from-host {lands}/from-host") == f"volume {index}\n" * 2
        _sh(box, f"echo guest > {guest}/from-guest", user="root")
        assert (host / str(index) / "from-guest").read_text() == "guest\n"


@pytest.mark.parametrize(
    ("guest", "message"),
    [("/kern/sys", "resolves to /proc/sys (through a symlink in the image): /proc is reserved"),
     ("/pw", "volume guest path '/pw': exists and is not a directory (at /etc/passwd")],
)
def test_a_volume_a_link_leads_astray_fails_the_start_clearly(runtime, linked_image, tmp_path,
                                                              guest, message):
    host = tmp_path / "vol"
    host.mkdir()
    box = runtime.create(BoxOptions(image=linked_image, name=unique("paths"), memory_mib=256,
                                    volumes=[f"{host}:{guest}"]))
    try:
        with pytest.raises(BoxliteError) as info:
            box.start()
        assert message in str(info.value)
        assert box.status is BoxStatus.FAILED
        assert list(host.iterdir()) == []
    finally:
        runtime.remove(box.id, force=True)


@pytest.mark.skipif(find_tool("virtiofsd") is None, reason="virtiofsd is not installed")
def test_a_box_naming_no_sharer_gets_virtiofs_where_virtiofsd_runs(linked_box):
    """Issue 17 item 7: 9p declares a limitation, so virtiofs stays the default."""
    box, _host = linked_box
    assert box.record.state["sharer"] == "virtiofs"
    mounts = [line.split() for line in _sh(box, "cat /proc/self/mounts").splitlines()]
    assert {fields[2] for fields in mounts if fields[1] in VOLUMES.values()} == {"virtiofs"}
