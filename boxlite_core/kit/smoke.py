"""Boot a kit by itself (no runtime, no agent connection): for the bench and the VM tests.

Why through a VMM backend: the core keeps no QEMU command line of its own. A smoke boot is a
:class:`~boxlite_core.vmm.spec.VmSpec` (:func:`smoke_spec`: the kit's kernel, initrd, cmdline and
guest hints, the guest root as a read-only disk with serial `bxguest`, a virtio-serial agent
channel, no network) handed to a registered backend ("qemu" unless told otherwise, through
:class:`~boxlite_core.plugins.PluginRegistry`), which plans and launches it exactly as it
would a box. :func:`boot_until` then watches the box's console log for a marker. The spec is
also the reference for a backend: this is the least a kit needs to boot. The channel is
virtio-serial, so the backend must offer it (qemu, libvirt); a smoke boot never dials the
agent, so a vsock backend would need only its channel kind here.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs

from ..errors import ConfigError
from ..vmm.base import VmmBackend
from ..vmm.spec import AgentChannel, ChannelKind, DiskSpec, VmSpec
from .initramfs import ROOT_SERIAL
from .model import GuestKit

#: the backend a smoke boot uses unless the caller names another
DEFAULT_BACKEND = "qemu"


def smoke_spec(kit: GuestKit, box_dir: Path, *, memory_mib: int = 512, cpus: int = 1,
               extra_cmdline: str = "", root_disk: bool = True) -> VmSpec:
    """The spec of a bare kit boot in ``box_dir`` (created; its unix sockets live there, so
    keep its path short). ``extra_cmdline`` is appended to the kit's cmdline (e.g.
    ``boxlite.init=marker``); ``root_disk=False`` leaves the guest root out (/init must fail
    and power off)."""
    box_dir = Path(box_dir)
    box_dir.mkdir(parents=True, exist_ok=True)
    disks = (DiskSpec(kit.root_image, "raw", read_only=True, serial=ROOT_SERIAL),)
    return VmSpec(
        box_id=f"smoke-{box_dir.name}",
        box_dir=box_dir,
        cpus=cpus,
        memory_mib=memory_mib,
        kernel=kit.kernel,
        initrd=kit.initrd,
        cmdline=f"{kit.cmdline} {extra_cmdline}".strip(),
        console_log=box_dir / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box_dir / "agent.port"),
        disks=disks if root_disk else (),
        guest=kit.guest_hints(),
    )


def smoke_backend(name: str = DEFAULT_BACKEND) -> VmmBackend:
    """The registered backend ``name``, checked usable here.

    Raises:
        NotFoundError: no plugin registers ``name``.
        ConfigError: the backend's probe says it cannot run on this host (with its fix).
    """
    from ..plugins import PluginRegistry  # the registry loads every plugin: only when booting

    backend = PluginRegistry().backend(name)
    probe = backend.probe()
    if not probe.available:
        raise ConfigError(
            f"backend {name!r} cannot boot the kit here: {probe.reason}"
            + (f" ({probe.fix})" if probe.fix else "")
        )
    return backend


@attrs.frozen
class BootResult:
    seconds_to_marker: float | None   # launch() called → marker in the console; None: never
    seconds_total: float
    console: str
    #: the VMM's exit status when it ended by itself and its handle knows it (the qemu
    #: handle does for a VM this process launched); None if it was killed or is unknown
    returncode: int | None
    exit_reason: str | None = None


def _read_new(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


def boot_until(spec: VmSpec, marker: str, timeout: float = 120.0,
               kill_after_marker: bool = False,
               backend: VmmBackend | str = DEFAULT_BACKEND) -> BootResult:
    """Launch ``spec`` with ``backend`` and time launch → the first console line holding
    ``marker``.

    Without ``kill_after_marker`` it then waits for the VM to end by itself (bench mode powers
    off); a VM still running at ``timeout`` is killed. The VM is gone when this returns.

    Raises:
        ConfigError, NotFoundError: as :func:`smoke_backend` (a backend given by name).
        BoxliteError: the backend's plan() or launch() refused or failed.
    """
    vmm = smoke_backend(backend) if isinstance(backend, str) else backend
    plan = vmm.plan(spec)
    start = time.monotonic()
    handle = vmm.launch(plan)
    buf = b""
    offset = 0
    found: float | None = None
    killed = False
    try:
        while time.monotonic() - start < timeout:
            data, offset = _read_new(spec.console_log, offset)
            buf += data
            if found is None and marker.encode() in buf:
                found = time.monotonic() - start
                if kill_after_marker:
                    break
            if not data:
                if not handle.is_running():
                    break
                time.sleep(0.02)
        if handle.is_running():
            if found is not None and not kill_after_marker:
                handle.wait(max(1.0, timeout - (time.monotonic() - start)))
            if handle.is_running():
                killed = True
                handle.kill()
    except BaseException:
        handle.kill()
        raise
    finally:
        handle.release()  # the console writer drains the last bytes and exits
    data, offset = _read_new(spec.console_log, offset)
    buf += data
    if found is None and marker.encode() in buf:
        found = time.monotonic() - start
    returncode = None if killed else getattr(handle, "returncode", None)
    return BootResult(found, time.monotonic() - start, buf.decode(errors="replace"),
                      returncode, handle.exit_reason())
