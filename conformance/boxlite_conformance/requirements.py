"""What the suite holds a backend to, SQLAlchemy-style: one object the gates ask.

The default reads the backend's own ``capabilities()``, so a backend is tested on exactly what
it declares. A vendor can subclass it (and override the ``conformance_requirements`` fixture)
to close a group on purpose — the report then shows those tests as skipped, with the reason,
rather than letting them disappear.
"""

from __future__ import annotations

from boxlite_core.models import Capability

#: volume sharer name → the backend capability it needs (mirrors VolumeSharer.capability)
SHARER_CAPABILITIES: dict[str, Capability] = {
    "9p": Capability.NINEP,
    "virtiofs": Capability.VIRTIOFS,
}


class Requirements:
    """Open/closed decisions for one backend."""

    def __init__(self, backend_name: str, capabilities: frozenset[Capability]) -> None:
        self.backend_name = backend_name
        self.capabilities = frozenset(capabilities)

    def has(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def closed_reason(self, caps: tuple[Capability, ...], any_of: bool) -> str | None:
        """None when the test may run, else the skip reason naming the capability."""
        missing = [c for c in caps if not self.has(c)]
        if any_of:
            if len(missing) < len(caps):
                return None
            names = ", ".join(repr(c.value) for c in caps)
            return f"backend {self.backend_name!r} declares none of the capabilities {names}"
        if missing:
            return (
                f"backend {self.backend_name!r} does not declare capability {missing[0].value!r}"
            )
        return None

    @property
    def volume_sharers(self) -> tuple[str, ...]:
        """Sharer names whose device kind this backend declares it can attach."""
        return tuple(n for n, c in SHARER_CAPABILITIES.items() if self.has(c))

    @property
    def default_rootfs(self) -> str:
        """The rootfs strategy the shared T1 box uses: disk needs qcow2, else a shared dir."""
        if self.has(Capability.QCOW2):
            return "disk"
        return "merged"
