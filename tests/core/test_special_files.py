"""No code path reads a special file as data (finding 9: copytree read dev/full, 78 GB).

Real parts: real device nodes made with mknod (as root), a real FIFO, the real bench seeding
function, a real tmpfs as the destination so that a regression fills 16 MiB, not the disk.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError, ImageError
from boxlite_core.fscopy import copy_file, copy_tree, open_regular
from boxlite_testing.tmpfs import small_tmpfs

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and mount need root")




def _special_tree(root: Path) -> Path:
    """A base-root-like tree: files, a symlink, dev/full + dev/zero nodes and a FIFO."""
    (root / "dev").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("guest\n")
    (root / "etc/link").symlink_to("hostname")
    os.mknod(root / "dev/full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    os.mknod(root / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    for name in ("full", "zero"):
        os.chmod(root / "dev" / name, 0o666)  # as in a real root (mknod went through umask)
    os.mkfifo(root / "dev/initctl")
    return root


@needs_root
@pytest.mark.timeout(60)
def test_copy_tree_makes_nodes_as_nodes_and_skips_the_fifo_without_blocking(tmp_path):
    src = _special_tree(tmp_path / "src")
    with small_tmpfs(tmp_path / "dst", "16m") as dst:
        report = copy_tree(src, dst / "root")
        out = dst / "root"
        assert (out / "etc/hostname").read_text() == "guest\n"
        assert os.readlink(out / "etc/link") == "hostname"
        for name, dev in (("full", (1, 7)), ("zero", (1, 5))):
            st = os.lstat(out / "dev" / name)
            assert stat.S_ISCHR(st.st_mode), f"dev/{name} should be a char device node"
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev
            assert stat.S_IMODE(st.st_mode) == 0o666, "mode must not go through the umask"
            assert st.st_size == 0
        assert not (out / "dev/initctl").exists()
        assert any("initctl" in s and "FIFO" in s for s in report.skipped), report
        assert sorted(report.nodes) == ["dev/full", "dev/zero"]
        # nothing was read from the nodes: the tmpfs holds a few KiB, not 16 MiB of zeros
        used = os.statvfs(dst)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize < 1024 * 1024


@needs_root
@pytest.mark.timeout(30)
def test_single_file_helpers_refuse_nodes_and_fifos_by_name(tmp_path):
    src = _special_tree(tmp_path / "src")
    with pytest.raises(ConfigError, match=r"dev/full is a character device"):
        copy_file(src / "dev/full", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"initctl is a FIFO"):
        open_regular(src / "dev/initctl", "test")  # O_NONBLOCK: the open cannot hang
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(30)
def test_image_import_of_a_fifo_is_refused_not_blocked_on(tmp_path):
    from boxlite_core.images.store import ImageStore
    from boxlite_core.state.db import Database

    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    home = tmp_path / "home"
    store = ImageStore(home, Database(home / "boxlite.db"))
    with pytest.raises(ImageError, match=r"image.tar is a FIFO"):
        store.import_path(fifo, name="x:1")


@needs_root
@pytest.mark.timeout(120)
def test_bench_seed_kit_copies_a_base_root_with_device_nodes_without_reading_them(
        tmp_path, monkeypatch):
    """The exact path of finding 9: bench/run_overhead.py --seed-from HOME."""
    sys.path[:0] = [str(REPO / "bench")]
    try:
        import run_overhead
    finally:
        sys.path.remove(str(REPO / "bench"))
    from boxlite_core.kit.builder import kit_cache_dir

    source = tmp_path / "source-home"
    _special_tree(kit_cache_dir(source) / "base" / "root")
    (kit_cache_dir(source) / "debs").mkdir()
    (kit_cache_dir(source) / "debs" / "a.deb").write_bytes(b"x" * 1000)

    class Kit:
        kit_id = "k1"

    monkeypatch.setattr(run_overhead, "find_kit",
                        lambda home, *a, **k: Kit() if home == source else None)
    monkeypatch.setenv("BOXLITE_DISK_RESERVE_MIB", "1")
    with small_tmpfs(tmp_path / "bench-home", "16m") as home:
        run_overhead.seed_kit(home, source)
        base = kit_cache_dir(home) / "base" / "root"
        assert stat.S_ISCHR(os.lstat(base / "dev/full").st_mode)
        assert (kit_cache_dir(home) / "debs" / "a.deb").stat().st_size == 1000
        st = os.statvfs(home)
        assert (st.f_blocks - st.f_bfree) * st.f_frsize < 1024 * 1024
