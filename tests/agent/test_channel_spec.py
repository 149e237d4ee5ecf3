"""The typed agent channel: AgentChannel's contract and how the core builds ``spec.agent``.

The core, not the backend, owns the channel's shape: it picks the socket name from the
backend's ``channel_kind``, carries its ``channel_handshake``, and for a vsock channel appends
``boxlite.agent_vsock=<port>`` to the kernel cmdline (no backend adds it any more).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.kit.model import GuestKit
from boxlite_core.models import BoxOptions
from boxlite_core.proto import wire
from boxlite_core.rootfs.base import DiskRootfs, RootfsArtifact
from boxlite_core.runtime.pipeline import StartContext, build_spec
from boxlite_core.vmm.spec import (
    AGENT_PORT_NAME,
    AGENT_VSOCK_CMDLINE_KEY,
    AGENT_VSOCK_PORT,
    AgentChannel,
    ChannelKind,
    GuestHints,
    Handshake,
)


def test_the_wire_names_are_defined_once_and_re_exported() -> None:
    assert (AGENT_PORT_NAME, AGENT_VSOCK_PORT, AGENT_VSOCK_CMDLINE_KEY) == (
        "org.boxlite.agent", 1024, "boxlite.agent_vsock"
    )
    assert wire.AGENT_PORT_NAME is AGENT_PORT_NAME and wire.READY == b"READY\n"


def test_agent_channel_defaults_validation_and_json(tmp_path: Path) -> None:
    serial = AgentChannel("virtio-serial", str(tmp_path / "agent.port"))
    assert serial.kind is ChannelKind.VIRTIO_SERIAL and serial.socket == tmp_path / "agent.port"
    assert (serial.port_name, serial.vsock_port, serial.handshake) == (
        AGENT_PORT_NAME, AGENT_VSOCK_PORT, Handshake.NONE
    )
    assert serial.cmdline_word == ""
    fc = AgentChannel(ChannelKind.VSOCK, tmp_path / "v.sock", vsock_port=5000,
                      handshake="firecracker-connect")
    assert fc.cmdline_word == "boxlite.agent_vsock=5000"
    assert json.loads(json.dumps(fc.to_dict())) == {
        "kind": "vsock", "socket": str(tmp_path / "v.sock"), "port_name": AGENT_PORT_NAME,
        "vsock_port": 5000, "handshake": "firecracker-connect",
    }
    with pytest.raises(ConfigError, match="vsock_port"):
        AgentChannel(ChannelKind.VSOCK, tmp_path / "v.sock", vsock_port=22)
    with pytest.raises(ConfigError, match=r"agent\.kind='stream'"):
        AgentChannel("stream", tmp_path / "v.sock")
    with pytest.raises(ConfigError, match=r"agent\.handshake='vhost'"):
        AgentChannel(ChannelKind.VSOCK, tmp_path / "v.sock", handshake="vhost")


def test_guest_hints_are_typed() -> None:
    hints = GuestHints(arch="x86_64", machine="microvm", virtio_transport="mmio",
                       qemu_globals=["a=b"], kit_id="k")
    assert hints.qemu_globals == ("a=b",)
    assert hints.to_dict()["qemu_globals"] == ["a=b"]
    with pytest.raises(ConfigError, match="virtio_transport"):
        GuestHints(virtio_transport="isa")


class _Backend:
    def __init__(self, kind: ChannelKind, handshake: Handshake = Handshake.NONE) -> None:
        self.channel_kind = kind
        self.channel_handshake = handshake


def _ctx(tmp_path: Path, backend: _Backend) -> StartContext:
    kit = GuestKit(
        kit_id="kit1", directory=tmp_path, kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd", root_image=tmp_path / "root.ext4",
        cmdline="console=ttyS0 quiet", machine="microvm",
        qemu_globals=("virtio-mmio.force-legacy=false",), arch="x86_64",
        manifest=tmp_path / "manifest.json",
    )
    record = SimpleNamespace(id="box1", name="b", options=BoxOptions())
    ctx = StartContext(services=None, record=record, box_dir=tmp_path / "box", backend=backend)
    ctx.kit = kit
    ctx.artifact = RootfsArtifact(guest=DiskRootfs(serial="bxroot"))
    return ctx


def test_build_spec_virtio_serial(tmp_path: Path) -> None:
    spec = build_spec(_ctx(tmp_path, _Backend(ChannelKind.VIRTIO_SERIAL)))
    assert spec.agent == AgentChannel(ChannelKind.VIRTIO_SERIAL, tmp_path / "box" / "agent.port")
    assert spec.cmdline == "console=ttyS0 quiet"
    assert spec.guest == GuestHints("x86_64", "microvm", "mmio",
                                    ("virtio-mmio.force-legacy=false",), "kit1")
    assert spec.backend_options == {}
    assert json.loads(json.dumps(spec.to_dict()))["guest"]["machine"] == "microvm"


def test_build_spec_vsock_adds_the_cmdline_key(tmp_path: Path) -> None:
    backend = _Backend(ChannelKind.VSOCK, Handshake.FIRECRACKER_CONNECT)
    spec = build_spec(_ctx(tmp_path, backend))
    assert spec.agent.kind is ChannelKind.VSOCK
    assert spec.agent.socket == tmp_path / "box" / "agent.sock"
    assert spec.agent.handshake is Handshake.FIRECRACKER_CONNECT
    assert spec.cmdline == f"console=ttyS0 quiet boxlite.agent_vsock={AGENT_VSOCK_PORT}"
