"""plan(): the ordered krun calls for a VmSpec, with no library and no hypervisor."""

from __future__ import annotations

import gzip
import json
import lzma
import struct
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.proto.wire import AGENT_VSOCK_PORT as AGENT_PORT
from boxlite_core.vmm.spec import AgentChannel, ChannelKind, ShareSpec
from boxlite_libkrun.backend import LibkrunBackend
from boxlite_libkrun.plan import kernel_format, krun_calls, libkrun_cmdline


def _names(calls):
    return [c["call"] for c in calls]


def test_plan_lists_krun_calls_in_order_with_values(spec_factory):
    spec = spec_factory()
    box = spec.box_dir
    calls = krun_calls(spec)
    assert [(c["call"], c["args"]) for c in calls] == [
        ("krun_set_log_level", [1]),
        ("krun_create_ctx", []),
        ("krun_set_vm_config", [2, 768]),
        (
            "krun_set_kernel",
            [
                str(spec.kernel),
                1,
                str(spec.initrd),
                "console=hvc0 quiet loglevel=3 panic=-1 reboot=t boxlite.agent_vsock=1024",
            ],
        ),
        ("krun_has_feature", [1]),
        ("krun_add_disk2", ["rootfs", str(box / "rootfs.qcow2"), 1, False]),
        ("krun_add_disk2", ["guestroot", str(box / "kit" / "guestroot.raw"), 0, True]),
        ("krun_add_virtiofs", ["vol0", "/srv/data"]),
        ("krun_add_virtiofs3", ["vol1", "/srv/ro", 0, True]),
        ("krun_disable_implicit_vsock", []),
        ("krun_add_vsock", [0]),
        ("krun_add_vsock_port2", [AGENT_PORT, str(box / "agent.sock"), True]),
        ("krun_set_console_output", [str(box / "console.fifo")]),
        ("krun_start_enter", []),
    ]
    # version guards the launcher relies on
    assert calls[6]["fallback"] == {
        "call": "krun_add_disk",
        "args": ["guestroot", str(box / "kit" / "guestroot.raw"), True],
    }
    assert "fallback" not in calls[5]  # qcow2 has no pre-disk2 fallback
    assert calls[4]["expect"] == 1 and calls[4]["if_present"] == "krun_has_feature"
    assert calls[9]["if_present"] == calls[10]["if_present"] == "krun_disable_implicit_vsock"


def test_plan_without_disks_or_shares_has_no_blk_check(spec_factory):
    calls = krun_calls(spec_factory(disks=(), shares=()))
    assert "krun_has_feature" not in _names(calls)
    assert not any(n.startswith(("krun_add_disk", "krun_add_virtiofs")) for n in _names(calls))


def test_plan_rejects_9p_share_naming_the_capability(spec_factory):
    spec = spec_factory(shares=(ShareSpec("v9", Path("/srv"), kind="9p"),))
    with pytest.raises(ConfigError, match=r"'9p'.*libkrun backend lacks"):
        krun_calls(spec)


def test_plan_rejects_network_and_too_many_cpus(spec_factory):
    with pytest.raises(ConfigError, match="networking"):
        krun_calls(spec_factory(network=True))
    with pytest.raises(ConfigError, match="1-255"):
        krun_calls(spec_factory(cpus=256))


def test_plan_rejects_duplicate_or_reserved_tag(spec_factory):
    dup = (ShareSpec("a", Path("/x"), kind="virtiofs"), ShareSpec("a", Path("/y"), kind="virtiofs"))
    with pytest.raises(ConfigError, match="used twice"):
        krun_calls(spec_factory(shares=dup))
    with pytest.raises(ConfigError, match="reserved"):
        krun_calls(spec_factory(shares=(ShareSpec("/dev/root", Path("/x"), kind="virtiofs"),)))


def test_plan_is_deterministic_and_json_serialisable(spec_factory, monkeypatch):
    monkeypatch.delenv("BOXLITE_LIBKRUN_PATH", raising=False)
    backend = LibkrunBackend()
    one, two = backend.plan(spec_factory()), backend.plan(spec_factory())
    assert one.to_json() == two.to_json()
    data = json.loads(one.to_json())
    assert data["backend"] == "libkrun"
    assert data["data"]["calls"] == krun_calls(spec_factory())


def test_plan_works_without_the_library(spec_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", str(tmp_path / "missing" / "libkrun.so.1"))
    plan = LibkrunBackend().plan(spec_factory())
    assert plan.data["library"] is None
    assert plan.data["calls"][-1]["call"] == "krun_start_enter"


def test_root_mode_uses_set_root_and_exec(spec_factory):
    spec = spec_factory(
        disks=(),
        shares=(),
        backend_options={
            "krun_root": "/srv/rootfs",
            "krun_exec": ["/bin/agent", "--port", "1024"],
            "krun_env": {"B": "2", "A": "1"},
            "krun_workdir": "/work",
        },
    )
    calls = [(c["call"], c["args"]) for c in krun_calls(spec)]
    assert calls[3:6] == [
        ("krun_set_root", ["/srv/rootfs"]),
        ("krun_set_workdir", ["/work"]),
        ("krun_set_exec", ["/bin/agent", ["--port", "1024"], ["A=1", "B=2"]]),
    ]
    assert "krun_set_kernel" not in _names(krun_calls(spec))


def test_cmdline_moves_console_to_hvc0_and_keeps_the_agent_vsock_port():
    # the core appends the key for a vsock channel (runtime/pipeline.py build_spec)
    key = f"boxlite.agent_vsock={AGENT_PORT}"
    assert libkrun_cmdline(f"console=ttyS0 quiet console=tty0 panic=-1 {key}") == (
        f"console=hvc0 quiet panic=-1 {key}"
    )
    assert libkrun_cmdline("console=ttyS0 quiet") == "console=hvc0 quiet"  # never adds one


def test_cmdline_keeps_an_explicit_agent_vsock_port():
    cmdline = "quiet boxlite.agent_vsock=2000"
    assert libkrun_cmdline(cmdline) == f"console=hvc0 {cmdline}"


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 4
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 0x100, len(payload))
    return bytes(head) + b"\0" * 0x100 + payload


def test_kernel_format_is_sniffed_from_the_file(tmp_path):
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + b"\0" * 100)
    gz = tmp_path / "bz-gz"
    gz.write_bytes(_bzimage(gzip.compress(b"\x7fELF")))
    xz = tmp_path / "bz-xz"
    xz.write_bytes(_bzimage(lzma.compress(b"\x7fELF")))
    arm = tmp_path / "Image"
    arm.write_bytes(b"\0" * 0x38 + b"ARMd" + b"\0" * 8)
    assert kernel_format(elf, {}) == "elf"
    assert kernel_format(gz, {}) == "image_gz"
    assert kernel_format(arm, {}) == "raw"
    assert kernel_format(tmp_path / "absent", {}) == "elf"
    assert kernel_format(xz, {"krun_kernel_format": "image_zstd"}) == "image_zstd"
    with pytest.raises(ConfigError, match="ELF vmlinux"):
        kernel_format(xz, {})
    with pytest.raises(ConfigError, match="krun_kernel_format"):
        kernel_format(elf, {"krun_kernel_format": "bzimage"})


def test_plan_sends_the_console_through_the_capped_writer_not_to_the_log(spec_factory, monkeypatch):
    # libkrun appends whatever the guest writes to hvc0 to the console_output path: the log
    # file itself would grow without limit, so libkrun is given the writer's named pipe
    monkeypatch.delenv("BOXLITE_LIBKRUN_PATH", raising=False)
    spec = spec_factory(console_log_max_bytes=1024 * 1024)
    plan = LibkrunBackend().plan(spec)
    (console,) = [c for c in plan.data["calls"] if c["call"] == "krun_set_console_output"]
    assert console["args"] == [str(spec.box_dir / "console.fifo")]
    assert str(spec.console_log) not in json.dumps(plan.data["calls"])
    assert plan.data["console_fifo"] == str(spec.box_dir / "console.fifo")
    assert plan.data["console_log_max_bytes"] == 1024 * 1024


def test_backend_options_unknown_key_and_wrong_channel_are_refused(spec_factory):
    with pytest.raises(ConfigError, match="'tcg_tb_size_mib'"):
        krun_calls(spec_factory(backend_options={"tcg_tb_size_mib": 64}))
    serial = AgentChannel(ChannelKind.VIRTIO_SERIAL, Path("/box/agent.port"))
    with pytest.raises(ConfigError, match="vsock only"):
        krun_calls(spec_factory(agent=serial))


def test_the_agent_vsock_port_comes_from_the_channel(spec_factory, tmp_path):
    spec = spec_factory(agent=AgentChannel(ChannelKind.VSOCK, tmp_path / "a.sock", vsock_port=5000))
    vsock = [c for c in krun_calls(spec) if c["call"] == "krun_add_vsock_port2"]
    assert vsock[0]["args"] == [5000, str(tmp_path / "a.sock"), True]
