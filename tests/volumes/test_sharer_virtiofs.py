"""virtiofs sharer: real virtiofsd processes (socket, mode, read-only, stop from elsewhere)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from boxlite_core import tools
from boxlite_core.errors import EngineError, ToolMissingError
from boxlite_core.models import HostShare
from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.spec import Capability
from boxlite_core.volumes import virtiofsd_launcher as launcher
from boxlite_core.volumes.virtiofs import (
    VirtiofsdInfo,
    VirtiofsSharer,
    detect_virtiofsd,
    launcher_argv,
    virtiofsd_argv,
)

VIRTIOFSD = tools.find_tool("virtiofsd")
needs_virtiofsd = pytest.mark.skipif(
    VIRTIOFSD is None or os.geteuid() != 0, reason="needs virtiofsd and root"
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    box = tmp_path / "box"
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    for d in (box, ro, rw):
        d.mkdir()
    (ro / "hello.txt").write_text("hi\n")
    return box, ro, rw


@needs_virtiofsd
def test_start_and_stop_real(dirs: tuple[Path, Path, Path]) -> None:
    box, ro, rw = dirs
    sharer = VirtiofsSharer()
    specs = sharer.start([HostShare("vol0", ro, True), HostShare("vol1", rw, False)], box)
    try:
        assert [s.kind for s in specs] == ["virtiofs", "virtiofs"]
        records = sharer.read_state(box)
        assert [r["tag"] for r in records] == ["vol0", "vol1"]
        for spec, record in zip(specs, records, strict=True):
            assert spec.socket == box / f"virtiofs-{spec.tag}.sock"
            mode = spec.socket.stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert _alive(record["pid"])
            assert (box / f"virtiofsd-{spec.tag}.log").exists()

        # read-only is enforced on the host: virtiofsd's own view of the share refuses writes
        # (the sandbox pivots into the share only once QEMU connects; until then /proc/PID/root
        # is the private mount namespace's /)
        ro_pid, rw_pid = records[0]["pid"], records[1]["pid"]
        assert (Path(f"/proc/{ro_pid}/root") / str(ro).lstrip("/") / "hello.txt").read_text()
        with pytest.raises(OSError) as err:
            (Path(f"/proc/{ro_pid}/root") / str(ro).lstrip("/") / "new.txt").write_text("x")
        assert err.value.errno == errno.EROFS
        (Path(f"/proc/{rw_pid}/root") / str(rw).lstrip("/") / "new.txt").write_text("x")
        assert (rw / "new.txt").read_text() == "x"
        assert not (ro / "new.txt").exists()
        assert records[0]["read_only_enforced_by"] in ("ro-bind-mount", "flag")
    finally:
        sharer.stop(box)
    assert all(not _alive(r["pid"]) for r in records)
    assert not any(box.glob("*.sock"))
    assert sharer.read_state(box) == []
    sharer.stop(box)  # idempotent


@needs_virtiofsd
def test_stop_from_another_process(dirs: tuple[Path, Path, Path]) -> None:
    box, _ro, rw = dirs
    sharer = VirtiofsSharer()
    sharer.start([HostShare("vol0", rw)], box)
    pid = sharer.read_state(box)[0]["pid"]
    code = (
        "import sys; from pathlib import Path;"
        "from boxlite_core.volumes.virtiofs import VirtiofsSharer;"
        "VirtiofsSharer().stop(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(box)], check=True, timeout=30)
    sharer.stop(box)  # reaps our child
    assert not _alive(pid)


@needs_virtiofsd
def test_dead_virtiofsd_reports_log(tmp_path: Path) -> None:
    box = tmp_path / "box"
    with pytest.raises(EngineError, match="virtiofsd for share 'gone'"):
        VirtiofsSharer().start([HostShare("gone", tmp_path / "missing")], box)
    assert VirtiofsSharer.read_state(box) == []


def test_c_argv_never_has_readonly_option() -> None:
    info = VirtiofsdInfo("/usr/lib/qemu/virtiofsd", "c", False, False)
    argv = virtiofsd_argv(info, HostShare("t", Path("/srv/d"), True), Path("/b/s.sock"))
    assert argv[:2] == ["/usr/lib/qemu/virtiofsd", "--socket-path=/b/s.sock"]
    assert "source=/srv/d" in argv and "sandbox=namespace" in argv
    assert not any("readonly" in a for a in argv)  # the C one rejects it: ro is a bind mount
    assert argv[argv.index("modcaps=-fsetid:-mknod:-setfcap") - 1] == "-o"
    # squashed: the daemon gets its listening socket and finds the share where the launcher
    # exposed it
    squashed = virtiofsd_argv(info, HostShare("t", Path("/srv/d"), False, 1000, 1000),
                              Path("/b/s.sock"), listen_fd=7, source="/tmp/boxlite-share")
    assert squashed[1] == "--fd=7" and "source=/tmp/boxlite-share" in squashed


RUST_HELP = """virtiofsd backend
Usage: virtiofsd [OPTIONS]
      --shared-dir <shared-dir>  Shared directory path
      --readonly                 Mark the shared directory read-only
      --translate-uid <map>      Map a guest UID to a host UID
      --translate-gid <map>      Map a guest GID to a host GID
      --socket-path <path>       vhost-user socket path
"""


def test_rust_flavour_detected_double(tmp_path: Path) -> None:
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + RUST_HELP + "EOF\n")
    fake.chmod(0o755)
    info = detect_virtiofsd(str(fake))
    assert info.flavour == "rust" and info.readonly_flag and info.translate_ids
    argv = virtiofsd_argv(info, HostShare("t", Path("/srv/d"), True, 1000, 100), Path("/s"))
    assert "--shared-dir=/srv/d" in argv and "--readonly" in argv
    assert "--translate-uid=squash-guest:0:1000:4294967295" in argv
    assert "--translate-gid=squash-guest:0:100:4294967295" in argv
    # no device nodes, file capabilities, or setuid bits kept across a write
    assert "--modcaps=-fsetid:-mknod:-setfcap" in argv
    wrapped = launcher_argv(argv, None, None)
    assert wrapped[2:4] == [launcher.__file__, "--no-privilege"] and wrapped[-len(argv):] == argv


@pytest.mark.skipif(VIRTIOFSD is None, reason="virtiofsd not installed")
def test_installed_flavour_detected() -> None:
    info = detect_virtiofsd(VIRTIOFSD)
    assert info.flavour in ("c", "rust")


def test_missing_virtiofsd_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "find_tool", lambda name: None)
    with pytest.raises(ToolMissingError, match="qemu-system-common"):
        VirtiofsSharer().check()


def test_registered_by_core() -> None:
    sharer = PluginRegistry(load_entry_points=False).volume_sharer("virtiofs")
    assert isinstance(sharer, VirtiofsSharer)
    assert sharer.capability is Capability.VIRTIOFS and sharer.guest_fstype == "virtiofs"
