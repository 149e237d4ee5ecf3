"""What a VMM backend is, for the vendor who writes one.

A backend turns a :class:`~boxlite_core.models.VmSpec` into a running VM. It is split in two
so tests can check it without a hypervisor:

* :meth:`VmmBackend.plan` is pure: spec in, serialisable :class:`LaunchPlan` out (QEMU argv,
  libvirt XML, the list of krun calls). Same spec, same plan — byte for byte.
* :meth:`VmmBackend.launch` executes a plan and returns a :class:`VmHandle`.

The handle's state must be recoverable from the box directory alone (:meth:`VmmBackend.attach`),
because a box outlives the host process that started it.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs

from ..models import Capability, ProbeResult, VmSpec


@attrs.frozen
class LaunchPlan:
    """A backend's complete, serialisable recipe for one VM.

    ``data`` holds whatever the backend executes (e.g. ``{"argv": [...]}`` or
    ``{"xml": "..."}``); it must survive ``json.dumps`` so plans can be logged and compared.
    """

    backend: str
    spec: VmSpec
    data: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "spec": self.spec.to_dict(), "data": dict(self.data)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


class VmHandle(abc.ABC):
    """A launched VM. Every method must be safe to call after the VM has died."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The host process that holds the VM (QEMU, the krun launcher), if there is one."""

    @abc.abstractmethod
    def is_running(self) -> bool:
        """True while the VM exists. Cheap: called in wait loops."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the VM has gone; True if it did within ``timeout``."""

    @abc.abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Ask the guest to power off, then force it after ``timeout``. Idempotent.

        The runtime asks the agent to shut down first; this is the VMM-level part
        (ACPI/QMP powerdown, then SIGTERM, then SIGKILL).
        """

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the VM at once, no questions asked. Idempotent."""

    def exit_reason(self) -> str | None:
        """Why the VM went away, if the backend knows (e.g. "killed by signal 9")."""
        return None

    def pause(self) -> None:
        raise NotImplementedError("this backend does not support pause")

    def resume(self) -> None:
        raise NotImplementedError("this backend does not support resume")

    def release(self) -> None:
        """Drop host-side resources (sockets, connections) without touching the VM."""


class VmmBackend(abc.ABC):
    """A VMM backend. Registered through ``boxlite_register_vmm_backends``.

    Construct cheaply: the runtime builds one instance per process and calls
    :meth:`probe` before use. Nothing here may boot a VM except :meth:`launch`.
    """

    #: registry name users type (``--backend NAME``)
    name: ClassVar[str] = ""

    @abc.abstractmethod
    def capabilities(self) -> frozenset[Capability]:
        """What this backend can do on a host where :meth:`probe` says available."""

    @abc.abstractmethod
    def probe(self) -> ProbeResult:
        """Check the host without booting: binaries, libraries, daemons, acceleration.

        Never raises for a missing dependency: return ``ProbeResult(False, reason, fix)``.
        """

    @property
    def agent_kind(self) -> str:
        """How this backend maps the agent socket: "virtio-serial" or "stream"."""
        return "virtio-serial"

    @abc.abstractmethod
    def plan(self, spec: VmSpec) -> LaunchPlan:
        """Pure: the complete launch recipe for ``spec``. Deterministic and JSON-serialisable."""

    @abc.abstractmethod
    def launch(self, plan: LaunchPlan) -> VmHandle:
        """Start the VM described by ``plan`` and return at once (do not wait for the guest).

        Must record in ``plan.spec.box_dir`` whatever :meth:`attach` needs later.
        """

    @abc.abstractmethod
    def attach(self, box_dir: Path) -> VmHandle | None:
        """Re-adopt the VM launched from ``box_dir`` by another process.

        Return None when no VM of this box is running any more (check the process identity,
        e.g. pid + start time, so a recycled pid is never taken for the VM).
        """
