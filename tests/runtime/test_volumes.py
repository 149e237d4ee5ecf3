from __future__ import annotations

import os

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.models import HostShare, VolumeSpec
from boxlite_core.volumes.resolve import resolve_user_volumes


def test_missing_host_path_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as err:
        resolve_user_volumes([VolumeSpec(str(missing), "/data")])
    assert str(missing) in str(err.value) and "mkdir -p" in str(err.value)


def test_file_is_not_a_directory(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_user_volumes([f"{f}:/data"])


def test_dangling_symlink(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target-missing")
    with pytest.raises(ConfigError, match="dangling symlink"):
        resolve_user_volumes([f"{link}:/data"])


def test_canonical_path_owner_and_tags(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    other = tmp_path / "other"
    other.mkdir()
    vols = resolve_user_volumes(
        [f"{tmp_path}/alias/../real:/a", VolumeSpec(str(other), "/b", read_only=True)]
    )
    assert [v.tag for v in vols] == ["uservol0", "uservol1"]
    assert vols[0].host_path == real.resolve()
    assert vols[0].uid == os.stat(real).st_uid and vols[0].gid == os.stat(real).st_gid
    assert vols[1].read_only and not vols[0].read_only
    assert isinstance(vols[1], HostShare) and vols[1].read_only is True


def test_bad_spec_syntax():
    with pytest.raises(ConfigError, match="HOST:GUEST"):
        resolve_user_volumes(["justonepart"])
    with pytest.raises(ConfigError, match="absolute"):
        resolve_user_volumes(["/tmp:relative"])
