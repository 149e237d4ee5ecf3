"""What a rootfs strategy tells the guest agent: typed on the host, the same JSON on the wire.

The agent runs from the built guest kit, so ``init_request`` must keep producing exactly the
InitRequest shapes the untyped ``guest`` dicts produced before (the agent's protocol must not
change), and the result must parse as an InitRequest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format

from boxlite_core.proto import agent_pb2 as pb
from boxlite_core.rootfs.base import DiskRootfs, GuestShare, LayersRootfs, RootfsArtifact
from boxlite_core.vmm.spec import DiskSpec


@pytest.mark.parametrize(
    ("guest", "want"),
    [
        (DiskRootfs("bxrootfs"),
         {"disk": {"serial": "bxrootfs", "fstype": "ext4", "read_only": False}}),
        (DiskRootfs("r", "xfs", read_only=True),
         {"disk": {"serial": "r", "fstype": "xfs", "read_only": True}}),
        (GuestShare("rootfs"), {"share": {"tag": "rootfs", "fstype": "virtiofs"}}),
        (GuestShare("rootfs", "bind", "ro"),
         {"share": {"tag": "rootfs", "fstype": "bind", "options": "ro"}}),
        (LayersRootfs((GuestShare("layer0"), GuestShare("layer1")), "bxupper"),
         {"layers": {"layers": [{"tag": "layer0", "fstype": "virtiofs"},
                                {"tag": "layer1", "fstype": "virtiofs"}],
                     "upper_serial": "bxupper", "upper_fstype": "ext4"}}),
    ],
)  # fmt: skip
def test_init_request_keeps_the_agents_shape(guest, want) -> None:
    got = guest.init_request("virtiofs")
    assert got == want
    request = json_format.ParseDict({**got, "volumes": [], "hostname": "b"}, pb.InitRequest())
    assert request.WhichOneof("rootfs") == next(iter(want))


def test_artifact_refuses_an_untyped_guest() -> None:
    with pytest.raises(TypeError, match="guest"):
        RootfsArtifact(guest={"disk": {"serial": "s"}})  # type: ignore[arg-type]


def test_artifact_to_dict_is_json(tmp_path: Path) -> None:
    art = RootfsArtifact(DiskRootfs("s"), disks=(DiskSpec(tmp_path / "d.qcow2", serial="s"),))
    assert art.to_dict()["guest"] == {"disk": {"serial": "s", "fstype": "ext4", "read_only": False}}
