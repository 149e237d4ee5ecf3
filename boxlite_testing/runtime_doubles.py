"""Throwaway in-test plugin: backends, a rootfs strategy and a sharer that need no VM.

Every class here is a double (the name says so): the runtime code under test is real, only
the hypervisor is replaced, because a real one cannot run in the fast test set.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from boxlite_core.errors import EngineError
from boxlite_core.hookspecs import hookimpl
from boxlite_core.kit import GuestKit
from boxlite_core.rootfs.base import DiskRootfs, RootfsArtifact, RootfsStrategy
from boxlite_core.vmm.base import LaunchPlan, VmmBackend
from boxlite_core.vmm.process import ProcessVmHandle
from boxlite_core.vmm.procstat import start_time
from boxlite_core.vmm.spec import Capability, DiskSpec, ProbeResult, ShareSpec
from boxlite_core.volumes.base import VolumeSharer

EVENTS: list[tuple[str, dict]] = []


class LaunchFailBackendDouble(VmmBackend):
    """Plans like a real backend, then refuses to launch: exercises the CleanupGuard."""

    name = "launchfail_double"

    def capabilities(self):
        return frozenset({Capability.NINEP, Capability.QCOW2, Capability.VIRTIO_SERIAL})

    def probe(self):
        return ProbeResult(True, reason="test double")

    def plan(self, spec):
        return LaunchPlan(self.name, spec, {"argv": ["launchfail_double", str(spec.kernel)]})

    def launch(self, plan):
        kernel = Path(plan.spec.kernel)
        if not kernel.exists():
            raise EngineError(f"kernel {kernel} does not exist (launchfail_double)")
        raise EngineError("launchfail_double refuses to launch")

    def attach(self, box_dir):
        return None


class NoShareBackendDouble(LaunchFailBackendDouble):
    """A backend that declares no file-sharing capability at all."""

    name = "noshare_double"

    def capabilities(self):
        return frozenset({Capability.QCOW2})


class PauseBackendDouble(LaunchFailBackendDouble):
    """Declares PAUSE (and still cannot launch)."""

    name = "pause_double"

    def capabilities(self):
        return super().capabilities() | {Capability.PAUSE}


class SleeperBackendDouble(LaunchFailBackendDouble):
    """"Launches" a real host process that only sleeps, in its own session with the box
    directory in its argv, like QEMU: the real runtime then spawns the real agent shim, which
    waits for a guest that never speaks. Writes no state file, so attach() finds nothing and
    only the record (state.vmm) and the box directory's process names can stop it."""

    name = "sleeper_double"

    def plan(self, spec):
        return LaunchPlan(self.name, spec, {"argv": [
            sys.executable, "-c", "import time; time.sleep(600)", "--box-dir", str(spec.box_dir),
        ]})

    def launch(self, plan):
        popen = subprocess.Popen(plan.data["argv"], start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return ProcessVmHandle(popen.pid, start_time(popen.pid), popen)


class MarkerStrategyDouble(RootfsStrategy):
    """Writes rootfs.qcow2 as a marker file so tests can see files are kept/removed."""

    name = "marker_double"

    def prepare(self, image, box_dir, ctx):
        marker = Path(box_dir) / "rootfs.qcow2"
        if not marker.exists():
            marker.write_text(image.digest)
        return RootfsArtifact(
            guest=DiskRootfs("rootfs", "ext4"),
            disks=(DiskSpec(marker, "qcow2", serial="rootfs"),),
        )

    def remove(self, box_dir):
        (Path(box_dir) / "rootfs.qcow2").unlink(missing_ok=True)


class VirtiofsOnlySharerDouble(VolumeSharer):
    name = "vfsonly_double"
    capability = Capability.VIRTIOFS
    guest_fstype = "virtiofs"

    def start(self, shares, box_dir):
        return tuple(ShareSpec(s.tag, s.host_path, self.name, s.read_only) for s in shares)


class NinePSharerDouble(VolumeSharer):
    name = "ninep_double"
    capability = Capability.NINEP
    guest_fstype = "9p"

    def start(self, shares, box_dir):
        (Path(box_dir) / "sharer.started").write_text(json.dumps([s.tag for s in shares]))
        return tuple(ShareSpec(s.tag, s.host_path, self.name, s.read_only) for s in shares)

    def stop(self, box_dir):
        (Path(box_dir) / "sharer.stopped").write_text("yes")


class Plugin:
    """The plugin object registered with the runtime (name: 'doubles')."""

    @hookimpl
    def boxlite_register_vmm_backends(self, register):
        register("launchfail_double", LaunchFailBackendDouble)
        register("noshare_double", NoShareBackendDouble)
        register("pause_double", PauseBackendDouble)
        register("sleeper_double", SleeperBackendDouble)

    @hookimpl
    def boxlite_register_rootfs_strategies(self, register):
        register("marker_double", MarkerStrategyDouble)

    @hookimpl
    def boxlite_register_volume_sharers(self, register):
        register("vfsonly_double", VirtiofsOnlySharerDouble)
        register("ninep_double", NinePSharerDouble)

    @hookimpl
    def boxlite_box_created(self, box):
        EVENTS.append(("created", {"box": box}))

    @hookimpl
    def boxlite_box_failed(self, box, error, stage):
        EVENTS.append(("failed", {"box": box, "error": error, "stage": stage}))

    @hookimpl
    def boxlite_box_stopped(self, box, reason):
        EVENTS.append(("stopped", {"box": box, "reason": reason}))


def kit_double(root: Path):
    """A guest kit whose kernel does not exist: a launch from it must fail."""

    def provide(home, progress):
        return GuestKit(
            kit_id="kit_double",
            directory=root,
            kernel=root / "no-such-vmlinux",
            initrd=root / "no-such-initrd",
            root_image=root / "no-such-root.ext4",
            cmdline="console=ttyS0",
            machine="q35",
            qemu_globals=(),
            arch="x86_64",
            manifest=root / "manifest.json",
        )

    return provide


def make_oci_layout(root: Path, files: dict[str, bytes], config: dict) -> Path:
    """A minimal OCI image layout (one uncompressed layer), as `skopeo copy oci:` writes."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    layer = buf.getvalue()
    layer_digest = put(layer)
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    cfg_bytes = json.dumps(cfg).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(cfg_bytes),
            "size": len(cfg_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    man_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(man_bytes),
                "size": len(man_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return root


TINY = "tiny:1"


def make_runtime(tmp_path: Path, **kw):
    from boxlite_core.plugins import PluginRegistry
    from boxlite_core.runtime.runtime import Runtime

    reg = PluginRegistry(load_entry_points=False, extra_plugins=[("doubles", Plugin())])
    kw.setdefault("kit_provider", kit_double(tmp_path / "kit"))
    return Runtime(tmp_path / "home", plugins=reg, **kw)


def opts(**kw):
    from boxlite_core.models import BoxOptions

    kw.setdefault("image", TINY)
    kw.setdefault("backend", "launchfail_double")
    kw.setdefault("rootfs", "marker_double")
    return BoxOptions(**kw)
