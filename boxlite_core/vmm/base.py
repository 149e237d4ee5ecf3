"""What a VMM backend is, for the vendor who writes one.

A backend turns a :class:`~boxlite_core.vmm.spec.VmSpec` into a running VM. It is split in two
so tests can check it without a hypervisor:

* :meth:`VmmBackend.plan` is pure: spec in, serialisable :class:`LaunchPlan` out (QEMU argv,
  libvirt XML, the list of krun calls). Same spec, same plan — byte for byte. It may read the
  host (find a binary, use facts its probe cached) but writes nothing; the core saves the plan
  as ``BOXDIR/plan.json`` (the first file to read when a boot goes wrong).
* :meth:`VmmBackend.launch` executes a plan and returns a :class:`VmHandle`.

The handle's state must be recoverable from the box directory alone (:meth:`VmmBackend.attach`),
because a box outlives the host process that started it.

Errors: every method says what it raises. The classes come from :mod:`boxlite_core.errors`
(``ConfigError`` for a spec or setting the backend cannot do, ``EngineError`` when the VMM
fails, ``UnsupportedError`` for an operation the backend does not offer); anything else
escaping a backend is a bug in it and reaches the user as such.
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import attrs

from ..errors import UnsupportedError
from ..models import JsonValue
from .spec import Capability, ChannelKind, DiskSwitch, Handshake, ProbeResult, VmSpec


@attrs.frozen
class LaunchPlan:
    """A backend's complete, serialisable recipe for one VM.

    ``data`` holds whatever the backend executes (e.g. ``{"argv": [...]}`` or
    ``{"xml": "..."}``); it must survive ``json.dumps`` so plans can be logged and compared.

    ``progress`` is not part of the recipe (never serialised or compared): the core sets it
    before :meth:`VmmBackend.launch`, so a launch that does long work first (uploading files
    to a remote host) can say so through :meth:`report`.
    """

    backend: str
    spec: VmSpec
    data: Mapping[str, JsonValue]
    progress: Callable[[str, float | None], None] | None = attrs.field(
        default=None, eq=False, repr=False)

    def report(self, message: str, fraction: float | None = None) -> None:
        """Tell the user what the launch is doing (``fraction`` 0..1 when known); a no-op
        without a progress display, and a broken display never fails the launch."""
        if self.progress is not None:
            with contextlib.suppress(Exception):
                self.progress(message, fraction)

    def to_dict(self) -> dict[str, JsonValue]:
        return {"backend": self.backend, "spec": self.spec.to_dict(), "data": dict(self.data)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


class VmHandle(abc.ABC):
    """A launched VM. Every method must be safe to call after the VM has died.

    A VM that is gone is a state, not an error: ``is_running``/``wait`` answer False/True,
    ``stop``/``kill``/``release`` do nothing. Methods raise only when the backend cannot
    find out or cannot act (its daemon or monitor does not answer).
    """

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The host process that holds the VM (QEMU, the krun launcher), if there is one.

        None when the VM runs in a process we do not know (e.g. a remote libvirtd's).
        Never raises.
        """

    @abc.abstractmethod
    def is_running(self) -> bool:
        """True while the VM exists. Cheap: called in wait loops.

        Raises:
            EngineError: only when the backend cannot tell (e.g. libvirtd does not answer
                within its bound); a dead VM is False, never an error.
        """

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the VM has gone; True if it did within ``timeout`` (seconds; None:
        no bound).

        Raises:
            EngineError: as :meth:`is_running`, when the backend cannot tell.
        """

    @abc.abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Ask the guest to power off, then force it after ``timeout`` seconds. Idempotent.

        The runtime asks the agent to shut down first; this is the VMM-level part
        (ACPI/QMP powerdown, then SIGTERM, then SIGKILL).

        Raises:
            EngineError: the VMM could not end the VM (e.g. libvirt's destroy failed while
                the domain still exists). A VM already gone is not an error.
        """

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the VM at once, no questions asked. Idempotent.

        Raises:
            EngineError: as :meth:`stop`, when the VMM refuses and the VM is still there.
        """

    def exit_reason(self) -> str | None:
        """Why the VM went away, if the backend knows (e.g. "killed by signal 9").

        Who reads it: the runtime puts it first in the error of a start whose VM died before
        the agent answered (``start failed in guest_connect: <your reason>; ...``), and in the
        record of a box whose VM went away (``boxlite inspect``: ``error``/``stop_reason``).
        It is often the only place a user learns why: a VMM that refuses an option may exit
        after its sockets exist, so quote the VMM's own last error line (its stderr or log)
        when it exited non-zero, and the signal when it was killed.

        None while the VM runs, or when the backend cannot say. Should not raise: it is read
        while an error message is being built (an ``EngineError`` from a backend that cannot
        reach its daemon is tolerated by the runtime).
        """
        return None

    def pause(self) -> None:
        """Freeze the VM's vCPUs; its memory and devices stay. Only for backends declaring
        :attr:`~boxlite_core.vmm.spec.Capability.PAUSE` (the runtime checks that, and that the
        box is running, before it calls).

        Raises:
            UnsupportedError: this backend does not offer pause (this default).
            StateError: the VM is not running (a backend may say so instead of EngineError).
            EngineError: the VMM did not pause it (monitor error or timeout, VM gone).
        """
        raise UnsupportedError(self._unsupported("pause"))

    def resume(self) -> None:
        """Let a paused VM run again.

        Raises:
            UnsupportedError: this backend does not offer pause/resume (this default).
            StateError: the VM is not running.
            EngineError: the VMM did not resume it.
        """
        raise UnsupportedError(self._unsupported("resume"))

    def save_state(
        self,
        directory: Path,
        *,
        switch_disks: Sequence[DiskSwitch] = (),
        resume: bool = True,
        restores_share_memory: bool = False,
    ) -> None:
        """Save the VM's memory and device state into ``directory``; only for backends
        declaring :attr:`~boxlite_core.vmm.spec.Capability.SNAPSHOT`.

        ``restores_share_memory``: many VMs will be restored from this state, several at once
        (a boot template). A backend that can should then keep the memory so that they share
        the pages none of them changes and need not copy it at start (qemu: a RAM file they
        map copy-on-write, boxlite_qemu.memimage); one that cannot ignores it. It may make
        the save slower. The core seals the files 0400 as always.

        The VM is paused for the save (a paused VM stays paused). Then each
        :class:`~boxlite_core.vmm.spec.DiskSwitch` is carried out while it is paused, so the
        saved memory and the frozen disks are of the same instant. With ``resume`` the VM runs
        again afterwards, as if nothing happened (its agent connection may be re-opened);
        without it the VM is left paused.

        ``directory`` exists and is empty; write only inside it, any files the backend's
        :meth:`VmmBackend.plan` needs to restore from it (``VmSpec.restore_from``). The core
        records the size and SHA-256 of every file there; a restore whose files changed is
        caught (sizes before the launch, digests while the VMM loads) before the box is used.
        Disk content is never saved here: the core keeps disks.

        Raises:
            UnsupportedError: this backend cannot save state (this default), or this VM
                cannot be saved now, naming why (QEMU refuses while a 9p share is mounted
                in the guest, and always for vhost-user devices such as virtiofs).
            StateError: the VM is not running.
            EngineError: the VMM failed or timed out during the save; the VM is resumed if
                ``resume`` (best effort) and ``directory`` may hold partial files. A backend
                whose save ends the VM (libvirt's) restores it; if that fails, say in the
                error that the state in ``directory`` is the VM's only copy.
        """
        raise UnsupportedError(self._unsupported("save the state of", "snapshot"))

    def _unsupported(self, operation: str, capability: str = "pause") -> str:
        cls = type(self)
        return (
            f"{cls.__name__} (backend package {cls.__module__.partition('.')[0]}) cannot "
            f"{operation} a VM: the backend does not declare the {capability!r} capability; "
            "use a backend that does (`boxlite backends` lists them)"
        )

    def release(self) -> None:
        """Drop host-side resources (sockets, connections) without touching the VM.

        Must not raise: it runs on every exit path of the runtime.
        """


class VmmBackend(abc.ABC):
    """A VMM backend. Registered through ``boxlite_register_vmm_backends``.

    Construct cheaply: the runtime builds one instance per process and calls
    :meth:`probe` before use. Nothing here may boot a VM except :meth:`launch`.
    """

    #: registry name users type (``--backend NAME``)
    name: ClassVar[str] = ""

    #: how the backend maps the agent socket into the guest; the core builds ``spec.agent``
    #: (an :class:`~boxlite_core.vmm.spec.AgentChannel`) from it
    channel_kind: ClassVar[ChannelKind] = ChannelKind.VIRTIO_SERIAL

    #: what the core must say on a fresh stream before it is the agent's (VSOCK channels:
    #: ``FIRECRACKER_CONNECT`` for Firecracker-style hybrid vsock)
    channel_handshake: ClassVar[Handshake] = Handshake.NONE

    @property
    def remote_host(self) -> str:
        """The machine this instance runs boxes on, in the backend's own terms (libvirt: the
        URI of a remote daemon); "" for this machine. The core records it in each box it
        creates (``BoxOptions.host``), so later commands reach the box where it runs."""
        return ""

    def for_host(self, host: str) -> VmmBackend:
        """An instance of this backend that runs boxes on ``host`` (``BoxOptions.host``,
        ``boxlite run --host``). The core asks once per host and process, and uses the
        result like any backend: probe, plan, launch, attach, forget.

        Raises:
            UnsupportedError: this backend runs boxes on this machine only (this default).
            ConfigError: ``host`` is not something this backend can reach (a malformed URI).
        """
        raise UnsupportedError(
            f"backend {self.name!r} runs boxes on this machine only; --host needs a backend "
            "that reaches other machines (libvirt)")

    def prune(self) -> list[str]:
        """Delete what this instance keeps on its machine that no box needs any more (a
        remote host's uploaded guest kits and image bases no VM or box disk uses); the names
        of what went. Called by ``boxlite images prune`` and ``guest build`` for every
        machine a box of this home is on. The default keeps nothing and does nothing.

        Raises:
            EngineError: that machine cannot be reached now.
        """
        return []

    def forget(self, box_dir: Path) -> None:
        """The box is being removed: delete what the backend keeps for it outside
        ``box_dir`` (a remote host's disk volumes). Called after the VM is gone. The default
        keeps nothing elsewhere and does nothing.

        Raises:
            EngineError: the place that holds them cannot be reached now; the core then
                keeps the box (record and directory), unless the removal is forced.
        """

    @abc.abstractmethod
    def capabilities(self) -> frozenset[Capability]:
        """What this backend can do on a host where :meth:`probe` says available.

        Declare only what works here: an accelerator the host lacks is not a capability
        (:func:`boxlite_core.vmm.accel.host_acceleration` says which the host gives).
        Cheap: it is asked at every start (sharer choice, pause) and for every backend by
        ``boxlite backends``, even one whose probe says unavailable.

        Raises:
            Nothing on purpose: a missing library or binary belongs in :meth:`probe`; answer
            what the backend would do. (``boxlite backends`` shows a raising backend as
            unavailable, naming the exception; during a start the exception fails the start.)
        """

    @abc.abstractmethod
    def probe(self) -> ProbeResult:
        """Check the host without booting: binaries, libraries, daemons, acceleration.

        Raises:
            Nothing for a missing dependency or an unusable host: return
            ``ProbeResult(False, reason, fix)`` instead. An exception that escapes anyway is
            reported as the backend being unavailable, naming its plugin as the one to fix.
        """

    @abc.abstractmethod
    def plan(self, spec: VmSpec) -> LaunchPlan:
        """Pure: the complete launch recipe for ``spec``. Deterministic and JSON-serialisable.

        It may read the host (find the VMM binary or library, use the facts :meth:`probe`
        found) but must not write anything: no files, directories, sockets or processes;
        the box directory may not exist yet. :meth:`launch` does the writing.

        With ``spec.restore_from`` set (SNAPSHOT backends only) the plan restores the state
        saved there instead of booting: same devices, the spec's own files behind them.

        Raises:
            UnsupportedError: ``spec.restore_from`` is set and this backend cannot restore.
            ConfigError: the spec asks for what this backend cannot do (a disk format,
                share kind or channel kind it lacks, a socket path over the unix limit, too
                many vCPUs, an unknown ``backend_options`` key), naming the field and the fix.
            ToolMissingError: (a ConfigError) the VMM program this plan names is not installed.
        """

    @abc.abstractmethod
    def launch(self, plan: LaunchPlan) -> VmHandle:
        """Start the VM described by ``plan`` and return at once (do not wait for the guest).

        Returns when the VMM runs (e.g. QEMU answers QMP), before the guest has booted; for a
        plan restoring ``spec.restore_from``, once the saved state is loaded and the VM runs
        again (its agent then answers within a second or so, no boot). The
        agent socket (``plan.spec.agent.socket``), which the backend creates as a server, may
        appear only after this returns: the core waits for it, and for the agent behind it,
        up to its boot timeout, while polling the handle's :meth:`VmHandle.is_running`.
        Must record in ``plan.spec.box_dir`` whatever :meth:`attach` needs later.

        Raises:
            ConfigError: the plan is another backend's.
            ToolMissingError: (a ConfigError) the VMM program or a helper is not installed.
            EngineError: the VMM failed to start (exited during start-up, its monitor never
                answered, the daemon refused the domain or did not answer in time); the
                message carries the VMM's last log lines. Nothing of this VM is left running.
            StateError: a VM of this box is already running under the VMM's name for it.
        """

    def snapshot_compat(self, spec: VmSpec) -> str:
        """What must be equal between the VM that saved a state and the one restoring it,
        beyond the spec's device layout (which the core compares itself): e.g. the VMM's
        version and binary, the accelerator. Backends declaring ``Capability.SNAPSHOT``
        override it; the core keys boot templates and checks snapshots with it, so a VMM
        upgrade makes old states unused instead of failing to load.

        Raises:
            UnsupportedError: this backend cannot save state (this default), or a VM of this
                spec could not be saved, naming why (e.g. a device that cannot migrate, such
                as QEMU's vhost-user-fs before 8.2). Cheap: no VM is started.
            EngineError: the backend could not find out (its daemon did not answer); the
                core then boots the box cold, naming the error.
        """
        raise UnsupportedError(
            f"backend {self.name!r} cannot save or restore a VM's state (it does not declare "
            "the 'snapshot' capability)"
        )

    @abc.abstractmethod
    def attach(self, box_dir: Path) -> VmHandle | None:
        """Re-adopt the VM launched from ``box_dir`` by another process.

        Return None when no VM of this box is running any more (check the process identity,
        e.g. pid + start time, so a recycled pid is never taken for the VM), or when the box
        directory holds no record of this backend (never launched, another backend's).

        Raises:
            EngineError: the backend cannot tell (e.g. its daemon is unreachable). The
                runtime logs it and treats the VM as unknown; a missing or unreadable state
                file is None, not an error.
        """
