"""Everything a backend author imports, from one module: ``from boxlite_core.vendor import ...``.

This module only re-exports; each name lives (and is documented) where the core defines it.
The full guide, with a "your first boot" walk-through, is ``conformance/README.md``; the two
examples under ``conformance/examples/`` import from here alone.

The map:

* The contract — :class:`VmmBackend` (subclass it: ``name``, ``channel_kind``,
  ``channel_handshake``, ``capabilities``, ``probe``, ``plan``, ``launch``, ``attach``),
  :class:`VmHandle` (what ``launch``/``attach`` return), :class:`LaunchPlan` (``plan``'s
  JSON-serialisable result, saved as ``BOXDIR/plan.json`` at every start: diff yours
  against the qemu backend's when a boot goes wrong). Every method's docstring says what it
  raises.
* What you are asked to boot — :class:`VmSpec` with its :class:`DiskSpec` disks,
  :class:`ShareSpec` shares, :class:`AgentChannel` (``kind`` a :class:`ChannelKind`,
  ``handshake`` a :class:`Handshake`; :data:`AGENT_PORT_NAME` is the virtio-serial port name,
  :data:`AGENT_VSOCK_PORT` the default guest vsock port) and :class:`GuestHints` (facts about
  the guest kit); ``spec.backend_options`` values are :data:`JsonValue`.
* What you declare — :class:`Capability` (each has a :class:`CapabilityGroup`: devices,
  operations, acceleration) and :class:`ProbeResult` (available, or why not and the fix).
  :func:`host_acceleration` gives the acceleration capabilities this host really has
  (:func:`kvm_usable`, :func:`hvf_usable` say why not): declare KVM only where it boots.
* Helpers — :class:`ProcessVmHandle`: a complete handle for a VM that lives and dies with one
  host process (pid + start time, SIGTERM then SIGKILL); :func:`start_time`: a process's
  start time, the identity ``attach`` checks so a recycled pid is never taken for your VM
  (a :data:`Fingerprint`, ``ProcessVmHandle``'s ``started``); :func:`require_tool`/:func:`run`:
  find and run an external program, failing with the errors below.
* The console cap — the guest writes what it likes to its console, so never hand the VMM a
  plain file: serve the console as a unix socket at ``BOXDIR/``:data:`CONSOLE_SOCKET` and run
  :func:`start_writer` (before the VMM) to copy it into ``spec.console_log`` under
  ``spec.console_log_max_bytes``, rotating; :func:`wait_writer` lets it drain once the VMM
  exited, :func:`stop_writer` ends it (any process, any number of times).
* Snapshots (optional: declare ``Capability.SNAPSHOT``) — ``VmHandle.save_state(directory,
  switch_disks=..., resume=..., restores_share_memory=...)`` writes the VM's memory and
  device state into a directory (for a boot template, in a form many restores may share if
  the backend can)
  and carries out each :class:`DiskSwitch` (the VM goes on writing a new qcow2 overlay while
  the old file is frozen); ``VmmBackend.snapshot_compat(spec)`` names what else must match
  for a restore (VMM version…); a spec with ``restore_from`` set must restore that state
  instead of booting. The core builds boot templates, snapshots and fork on these three.
* Errors — raise these, never bare exceptions: :class:`ConfigError` (a spec or setting you
  cannot do; :class:`ToolMissingError` for a missing program), :class:`EngineError` (the VMM
  failed), :class:`UnsupportedError` (an operation you do not offer), :class:`StateError`
  (wrong state, e.g. a VM already running); all are :class:`BoxliteError`.
* Registration — a plugin module's functions decorated with :data:`hookimpl`; the backend
  hook receives a :data:`RegisterFn`.
* The other plugin kinds — a volume sharer subclasses :class:`VolumeSharer` (its ``start``
  turns each :class:`HostShare` into a :class:`ShareSpec`); a rootfs strategy subclasses
  :class:`RootfsStrategy` (its ``prepare`` gets a :class:`RootfsContext` and returns a
  :class:`RootfsArtifact` whose ``guest``, a :data:`GuestRootfs`, tells the guest agent what
  to mount as root: a :class:`DiskRootfs`, a :class:`GuestShare` or :class:`LayersRootfs`).

To boot, a backend must: start ``spec.kernel`` with ``spec.initrd`` and ``spec.cmdline``
passed verbatim (the core has already added what the guest needs, e.g. the vsock key), with
``spec.cpus`` and ``spec.memory_mib``; attach ``spec.disks`` in order as virtio-blk devices
carrying each disk's ``serial`` (the guest finds its root disk by serial), in the format given;
attach each share under its ``tag``; serve the agent channel as a unix socket server at
``spec.agent.socket`` (a virtio-serial port named ``spec.agent.port_name``, or vsock to
``spec.agent.vsock_port``); send the guest console to ``spec.console_log`` through the
capped writer; and return from ``launch`` once the VMM runs, with what ``attach`` needs
written in ``spec.box_dir``. The core then waits for the socket (which proves nothing about
the VMM's devices: have your handle's ``exit_reason`` quote the VMM when it exits) and speaks
to the guest agent itself.
"""

from __future__ import annotations

from .errors import (
    BoxliteError,
    ConfigError,
    EngineError,
    StateError,
    ToolMissingError,
    UnsupportedError,
)
from .hookspecs import RegisterFn, hookimpl
from .models import HostShare, JsonValue
from .rootfs.base import (
    DiskRootfs,
    GuestRootfs,
    GuestShare,
    LayersRootfs,
    RootfsArtifact,
    RootfsContext,
    RootfsStrategy,
)
from .tools import require_tool, run
from .vmm.accel import host_acceleration, hvf_usable, kvm_usable
from .vmm.base import LaunchPlan, VmHandle, VmmBackend
from .vmm.consolelog import CONSOLE_SOCKET, start_writer, stop_writer, wait_writer
from .vmm.process import Fingerprint, ProcessVmHandle
from .vmm.procstat import start_time
from .vmm.spec import (
    AGENT_PORT_NAME,
    AGENT_VSOCK_PORT,
    AgentChannel,
    Capability,
    CapabilityGroup,
    ChannelKind,
    DiskSpec,
    DiskSwitch,
    GuestHints,
    Handshake,
    ProbeResult,
    ShareSpec,
    VmSpec,
)
from .volumes.base import VolumeSharer

#: sorted; the module docstring groups them by purpose
__all__ = [
    "AGENT_PORT_NAME",
    "AGENT_VSOCK_PORT",
    "CONSOLE_SOCKET",
    "AgentChannel",
    "BoxliteError",
    "Capability",
    "CapabilityGroup",
    "ChannelKind",
    "ConfigError",
    "DiskRootfs",
    "DiskSpec",
    "DiskSwitch",
    "EngineError",
    "Fingerprint",
    "GuestHints",
    "GuestRootfs",
    "GuestShare",
    "Handshake",
    "HostShare",
    "JsonValue",
    "LaunchPlan",
    "LayersRootfs",
    "ProbeResult",
    "ProcessVmHandle",
    "RegisterFn",
    "RootfsArtifact",
    "RootfsContext",
    "RootfsStrategy",
    "ShareSpec",
    "StateError",
    "ToolMissingError",
    "UnsupportedError",
    "VmHandle",
    "VmSpec",
    "VmmBackend",
    "VolumeSharer",
    "hookimpl",
    "host_acceleration",
    "hvf_usable",
    "kvm_usable",
    "require_tool",
    "run",
    "start_time",
    "start_writer",
    "stop_writer",
    "wait_writer",
]
