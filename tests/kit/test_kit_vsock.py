"""vsock guest modules: in the kit, loaded by /init only when the cmdline asks for the agent
on vsock (the core adds ``boxlite.agent_vsock=PORT`` for a vsock channel: libkrun, hvf), so
QEMU boots pay nothing.

The boot test adds the key to a QEMU boot by hand: the qemu backend has no vsock device, but
/init's choice depends on the cmdline only (the agent then serves on virtio-serial)."""

from __future__ import annotations

import json
import subprocess

import pytest

from boxlite_core import tools
from boxlite_core.kit import EXEC_MARKER, GuestKit
from boxlite_core.kit.initramfs import VSOCK_MARKER, init_script
from boxlite_core.kit.modules import GUEST_MODULES, VSOCK_MODULES, split_vsock
from boxlite_core.kit.smoke import boot_until, smoke_spec

VSOCK_KO = [
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
]


def test_guest_modules_include_the_vsock_transport() -> None:
    assert {
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
    } == VSOCK_MODULES
    assert set(GUEST_MODULES) >= VSOCK_MODULES


def test_split_vsock_keeps_load_order() -> None:
    order = ["kernel/a/virtio_blk.ko", VSOCK_KO[0], "kernel/b/ext4.ko", *VSOCK_KO[1:]]
    assert split_vsock(order) == (["kernel/a/virtio_blk.ko", "kernel/b/ext4.ko"], VSOCK_KO)


def _run_case_block(script: str, cmdline: str) -> str:
    """Run /init's vsock block alone with insmod replaced by echo, against `cmdline`."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if "boxlite.agent_vsock=" in line) - 1
    end = next(i for i in range(start, len(lines)) if lines[i] == "esac")
    block = "\n".join(lines[start : end + 1])
    shell = f'insmod() {{ echo "load $1"; }}\ncmdline=" {cmdline} "\n{block}\n'
    busybox = tools.require_tool("busybox")
    return subprocess.run(
        [busybox, "sh", "-c", shell], capture_output=True, text=True, check=True
    ).stdout


def test_init_loads_vsock_modules_only_when_asked() -> None:
    script = init_script(["a/dep.ko"], VSOCK_KO)
    busybox = tools.require_tool("busybox")
    for text in (script, init_script(["a/dep.ko"])):
        proc = subprocess.run([busybox, "sh", "-n"], input=text.encode(), capture_output=True)
        assert proc.returncode == 0, proc.stderr
    asked = _run_case_block(script, "console=hvc0 quiet boxlite.agent_vsock=1024")
    assert asked.splitlines() == [
        *(f"load /lib/modules/{p}" for p in VSOCK_KO),
        VSOCK_MARKER,
    ]
    assert _run_case_block(script, "console=ttyS0 quiet") == ""
    assert _run_case_block(script, "boxlite.agent_vsockx=1") == ""


@pytest.mark.vm
def test_kit_ships_vsock_modules(built_kit: GuestKit) -> None:
    manifest = json.loads(built_kit.manifest.read_text())
    loaded = manifest["initramfs"]["vsock_modules"]
    assert sorted(p.rsplit("/", 1)[-1] for p in loaded) == sorted(f"{m}.ko" for m in VSOCK_MODULES)
    assert not set(loaded) & set(manifest["initramfs"]["modules"])


@pytest.mark.vm
def test_boot_with_agent_vsock_loads_the_modules(built_kit: GuestKit, tmp_path) -> None:
    result = boot_until(
        smoke_spec(built_kit, tmp_path / "b", extra_cmdline="boxlite.agent_vsock=1024"),
        EXEC_MARKER,
        timeout=120,
        kill_after_marker=True,
    )
    assert result.seconds_to_marker is not None, result.console[-2000:]
    assert VSOCK_MARKER in result.console, result.console[-2000:]
    assert "boxlite-init: error" not in result.console


@pytest.mark.vm
def test_plain_boot_skips_the_vsock_modules(built_kit: GuestKit, tmp_path) -> None:
    result = boot_until(
        smoke_spec(built_kit, tmp_path / "b"),
        EXEC_MARKER,
        timeout=120,
        kill_after_marker=True,
    )
    assert result.seconds_to_marker is not None, result.console[-2000:]
    assert VSOCK_MARKER not in result.console
