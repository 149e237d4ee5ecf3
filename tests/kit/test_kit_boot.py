"""Real boots of the built kit through the qemu backend (TCG): bench marker, full init, init
failure. kit.smoke builds the VmSpec; the registered backend plans and launches it."""

from __future__ import annotations

import json

import pytest

from boxlite_core.kit import EXEC_MARKER, START_MARKER, GuestKit
from boxlite_core.kit.smoke import boot_until, smoke_spec

pytestmark = pytest.mark.vm


def test_manifest_lists_packages_and_wheels(built_kit: GuestKit) -> None:
    manifest = json.loads(built_kit.manifest.read_text())
    names = {p["name"]: p["version"] for p in manifest["packages"]}
    assert any(n.startswith("linux-image-") for n in names)
    assert {"busybox-static", "python3", "mount", "libstdc++6"} <= set(names)
    assert all(v for v in names.values())
    assert {w["name"] for w in manifest["wheels"]} >= {"grpcio", "protobuf"}
    assert manifest["kit_id"] == built_kit.kit_id
    for path in (built_kit.kernel, built_kit.initrd, built_kit.root_image):
        assert path.stat().st_size > 0
        assert path.parent == built_kit.directory


def test_bench_mode_reaches_start_marker_and_powers_off(built_kit: GuestKit, tmp_path) -> None:
    result = boot_until(
        smoke_spec(built_kit, tmp_path / "b", extra_cmdline="boxlite.init=marker"),
        START_MARKER,
        timeout=120,
    )
    assert result.seconds_to_marker is not None, result.console[-2000:]
    assert result.returncode == 0, result.console[-2000:]
    assert EXEC_MARKER not in result.console


def test_full_init_mounts_guest_root_and_execs_agent(built_kit: GuestKit, tmp_path) -> None:
    result = boot_until(
        smoke_spec(built_kit, tmp_path / "b"),
        EXEC_MARKER,
        timeout=120,
        kill_after_marker=True,
    )
    assert result.seconds_to_marker is not None, result.console[-2000:]
    assert "boxlite-init: error" not in result.console


def test_missing_root_disk_prints_error_and_powers_off(built_kit: GuestKit, tmp_path) -> None:
    spec = smoke_spec(built_kit, tmp_path / "b", root_disk=False)  # no virtio-blk at all
    result = boot_until(spec, "boxlite-init: error", timeout=120)
    assert result.seconds_to_marker is not None, result.console[-2000:]
    assert "serial bxguest" in result.console
    assert result.returncode == 0  # QEMU exited by itself (poweroff -f): no hang
