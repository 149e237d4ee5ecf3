"""Images whose layers broke boxes (boxlite issue 17 items 1 and 2), booted for real.

* The layered image of the conformance suite (boxlite_conformance.layered_image: whiteouts,
  opaque directories, hardlinks across layers, symlinks, user xattrs) under ``--rootfs
  layers`` through each sharer: the guest's overlayfs must show the view the OCI layer rules
  make. Before, an opaque directory showed the lower entries again (the guest's overlayfs
  never saw ``trusted.overlay.opaque`` through virtiofs or 9p) and the hardlink to a lower
  file made the start fail as "malformed".
* An image whose layers are all zstd (``tar+zstd``) starts and shows its files, under each
  strategy.

One box at a time (TCG on a 2-core host); each is removed before the next starts.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from boxlite_conformance import layered_image
from boxlite_core.images.oci import OCI_LAYER_ZSTD
from boxlite_core.models import BoxOptions
from boxlite_testing.homes import unique
from boxlite_testing.oci import decode, oci_layout_files, write_dir
from boxlite_testing.zstd_cases import BIG, LOWER, UPPER

pytestmark = pytest.mark.vm

LAYERED = "layered-vm:1"
ZSTD_IMAGE = "zstd-vm:1"


@pytest.fixture(scope="module")
def layered(runtime) -> bool:
    """The layered image in the shared home; True when it carries the xattr helper."""
    return layered_image.import_into(runtime.images, LAYERED)


@pytest.fixture(scope="module")
def zstd_image(runtime, tmp_path_factory) -> str:
    """busybox's layers re-compressed as zstd, plus the zstd cases' two layers."""
    busybox = runtime.images.get("busybox")
    tars = [decode(runtime.images.blobs.path(x.digest).read_bytes()) for x in busybox.layers]
    files = oci_layout_files([*tars, LOWER, UPPER], ref=ZSTD_IMAGE, codec="zstd")
    image = runtime.images.import_path(write_dir(files, tmp_path_factory.mktemp("zstd")))
    assert {x.media_type for x in image.layers} == {OCI_LAYER_ZSTD}
    return ZSTD_IMAGE


def _start(runtime, image: str, rootfs: str, sharer: str | None = None):
    box = runtime.create(BoxOptions(image=image, name=unique("layers"), memory_mib=256,
                                    rootfs=rootfs, volume_sharer=sharer))  # fmt: skip
    try:
        box.start()
    except BaseException:
        runtime.remove(box.id, force=True)
        raise
    return box


def _run(box, script: str, *args: str) -> str:
    result = box.exec(["sh", "-c", script, "sh", *args], timeout=120)
    assert result.ok, result.stderr
    return result.stdout.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="the layers strategy's whiteouts need root")
@pytest.mark.parametrize("sharer", ["virtiofs", "9p"])
def test_layers_rootfs_shows_the_layered_image_as_the_oci_rules_make_it(
    runtime, layered: bool, sharer: str
):
    box = _start(runtime, LAYERED, "layers", sharer)
    try:
        mounts = _run(box, "cat /proc/mounts")
        assert " / overlay " in mounts and "userxattr" in mounts, mounts
        seen = layered_image.parse_listing(_run(box, layered_image.LISTING_SCRIPT))
        # the input first: the opaque directory shows only the upper layer's entry
        assert [p for p in seen if p.startswith("t/app/")] == ["t/app/new.conf"]
        assert seen["t/hl/link"] == layered_image.EXPECTED["t/hl/link"]
        assert sorted(seen) == sorted(layered_image.EXPECTED)
        wrong = {p: (seen[p], w) for p, w in layered_image.EXPECTED.items() if w and seen[p] != w}
        assert not wrong
        if layered:
            paths = sorted(layered_image.EXPECTED)
            out = _run(box, f'cd / && exec {layered_image.XATTR_HELPER} "$@"', *paths)
            assert layered_image.parse_xattrs(out) == layered_image.EXPECTED_XATTRS
        # the box writes over what the image deleted: overlayfs keeps the rules in the upper
        _run(box, "echo again > /t/app/old.conf && rm /t/app/new.conf && mkdir /t/gonedir")
        listing = _run(box, "ls -1a /t/app; echo --; ls -1a /t/gonedir")
        assert listing == ".\n..\nold.conf\n--\n.\n..\n"
    finally:
        runtime.remove(box.id, force=True)


@pytest.mark.parametrize("rootfs", ["disk", "merged", "layers"])
def test_box_starts_from_zstd_layers_and_shows_the_files(runtime, zstd_image: str, rootfs):
    if rootfs == "layers" and os.geteuid() != 0:
        pytest.skip("the layers strategy's whiteouts need root")
    box = _start(runtime, zstd_image, rootfs)
    try:
        out = _run(box, "cat /etc/os; ls /etc/gone 2>&1; /opt/tool; readlink /opt/link; "
                   "md5sum /opt/big.bin | cut -d' ' -f1; stat -c %h /opt/again")  # fmt: skip
        assert out.splitlines() == [
            "zstd upper", "ls: /etc/gone: No such file or directory", "tool", "tool",
            hashlib.md5(BIG).hexdigest(), "2",
        ]  # fmt: skip
    finally:
        runtime.remove(box.id, force=True)
