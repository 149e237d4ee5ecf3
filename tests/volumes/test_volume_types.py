"""One volume from the user to the sharer: ``VolumeSpec`` (stored) → ``HostShare`` (per start).

Box records written before the volume types were merged must keep loading: the record holds
``VolumeSpec``'s JSON only, never the resolved facts.
"""

from __future__ import annotations

import os
from pathlib import Path

from boxlite_core.models import BoxOptions, HostShare, VolumeSpec
from boxlite_core.volumes.resolve import resolve_user_volumes


def test_record_shape_and_old_records_load(tmp_path: Path) -> None:
    old_record = {"image": "busybox", "volumes": [
        {"host_path": str(tmp_path), "guest_path": "/data", "read_only": True},
        f"{tmp_path}:/logs",
    ]}  # fmt: skip
    options = BoxOptions.from_dict(old_record)
    assert options.volumes == (VolumeSpec(str(tmp_path), "/data", True),
                               VolumeSpec(str(tmp_path), "/logs", False))  # fmt: skip
    assert options.to_dict()["volumes"] == [
        {"host_path": str(tmp_path), "guest_path": "/data", "read_only": True},
        {"host_path": str(tmp_path), "guest_path": "/logs", "read_only": False},
    ]
    assert BoxOptions.from_dict(options.to_dict()) == options


def test_a_resolved_volume_is_what_the_sharer_gets(tmp_path: Path) -> None:
    (share,) = resolve_user_volumes([VolumeSpec(str(tmp_path / "."), "/data", True)])
    st = os.stat(tmp_path)
    assert share == HostShare("uservol0", tmp_path.resolve(), True, st.st_uid, st.st_gid,
                              guest_path="/data")  # fmt: skip
    assert share.to_dict()["guest_path"] == "/data"
    rootfs_share = HostShare("rootfs", tmp_path)
    assert rootfs_share.guest_path is None and rootfs_share.uid is None
    assert "guest_path" not in rootfs_share.to_dict()
