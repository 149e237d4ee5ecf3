"""What the suite holds a backend to, SQLAlchemy-style: one object the gates ask.

The default reads the backend's own ``capabilities()``, so a backend is tested on exactly what
it declares. A vendor can subclass it (and override the ``conformance_requirements`` fixture)
to close a group on purpose — the report then shows those tests as skipped, with the reason,
rather than letting them disappear.

Every gate has a name: a :class:`~boxlite_core.vmm.spec.Capability` the backend declares, or a
named :class:`HostRequirement` (:data:`HOST_REQUIREMENTS`) for what is not the backend's to
declare — whether this host can serve a sharer (virtiofsd installed), or whether a sharer
promises a behaviour (auto-idmap). A skip always says which one closed the test, and why.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import attrs

from boxlite_core.errors import BoxliteError
from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.spec import Capability
from boxlite_core.volumes.base import VolumeSharer

#: volume sharer name → the backend capability it needs (mirrors VolumeSharer.capability)
SHARER_CAPABILITIES: dict[str, Capability] = {
    "9p": Capability.NINEP,
    "virtiofs": Capability.VIRTIOFS,
}


class Requirements:
    """Open/closed decisions for one backend."""

    def __init__(
        self,
        backend_name: str,
        capabilities: frozenset[Capability],
        registry: PluginRegistry | None = None,
        remote_host: str = "",
    ) -> None:
        self.backend_name = backend_name
        self.capabilities = frozenset(capabilities)
        #: the other machine the backend runs boxes on (VmmBackend.remote_host), "" for this
        self.remote_host = remote_host
        #: where volume sharers are looked up for host requirements (default: installed ones)
        self.registry = registry

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

    def host_unmet(self, name: str, params: Mapping[str, object]) -> str | None:
        """None when host requirement ``name`` holds for a test with these parameters, else
        the skip reason naming the requirement and why.

        Raises:
            KeyError: ``name`` is not in :data:`HOST_REQUIREMENTS`.
        """
        requirement = HOST_REQUIREMENTS[name]
        why = requirement.unmet(self, params)
        return f"host requirement {name!r} not met: {why}" if why else None

    def sharer(self, name: str) -> VolumeSharer:
        """The volume sharer registered as ``name``, from the run's registry."""
        return (self.registry or PluginRegistry()).volume_sharer(name)

    def declared_limitation(self, name: str, params: Mapping[str, object]) -> str | None:
        """When the test's ``sharer`` parameter declares limitation ``name``
        (``VolumeSharer.limitations``): why the test is expected to fail there; else None."""
        if "sharer" not in params:
            return None
        sharer = str(params["sharer"])
        for limitation in self.sharer(sharer).limitations:
            if limitation.name == name:
                return (f"declared limitation {name!r} of volume sharer {sharer!r}: "
                        f"{limitation.summary}")
        return None


@attrs.frozen
class HostRequirement:
    """A fact a test needs that is not a backend capability: about the host (a daemon is
    installed) or a volume sharer (it maps ids). Gated like a capability, by name
    (``needs_host(NAME)``): the test is skipped with the requirement's name and why.

    ``strict``: under ``--conformance-strict`` an unmet requirement fails the test instead —
    for things the host a backend is certified on should have (a missing daemon), not for
    promises a sharer never makes (auto-idmap on 9p).
    """

    name: str
    #: what the test relies on, for the docs and ``boxlite-conformance list``
    promise: str
    #: (requirements, test parameters) -> None when met, else why not
    unmet: Callable[[Requirements, Mapping[str, object]], str | None]
    strict: bool = False


def _sharer_serves_here(req: Requirements, params: Mapping[str, object]) -> str | None:
    """The test's ``sharer`` parameter, or (a rootfs through a share) any declared sharer."""
    names = [str(params["sharer"])] if "sharer" in params else list(req.volume_sharers)
    reasons = []
    for name in names:
        capability = SHARER_CAPABILITIES.get(name)
        try:
            req.sharer(name).check()
            return None
        except BoxliteError as exc:
            declared = f"capability {capability.value!r} declared" if capability else name
            reasons.append(f"{declared}, but this host cannot serve a {name} share: {exc}")
    return "; ".join(reasons) or "no volume sharer is declared"


def _sharer_maps_ids(req: Requirements, params: Mapping[str, object]) -> str | None:
    name = str(params.get("sharer", ""))
    if req.sharer(name).idmap:
        return None
    return (
        f"volume sharer {name!r} does not map what the guest writes to the volume's owner "
        "(VolumeSharer.idmap is False: those files belong to its file server's user, for 9p "
        "QEMU's); the owner check runs for sharers that promise it (virtiofs)"
    )


def _runs_here(req: Requirements, params: Mapping[str, object]) -> str | None:
    if not req.remote_host:
        return None
    return (f"backend {req.backend_name!r} runs boxes on {req.remote_host}: a directory of "
            "this machine cannot be shared into them (volumes there are that machine's)")


SHARES_FROM_HERE = HostRequirement(
    "shares-from-here",
    "a directory of this machine can be shared into the backend's VMs (they run here, not "
    "on another machine: VmmBackend.remote_host is empty)",
    _runs_here,
)
SHARER_SERVES = HostRequirement(
    "sharer-on-host",
    "the test's volume sharer (a rootfs through a share: one declared sharer) can serve "
    "shares on this host (virtiofs: virtiofsd installed and usable)",
    _sharer_serves_here,
    strict=True,
)
AUTO_IDMAP = HostRequirement(
    "auto-idmap",
    "files the guest writes into a volume belong to the volume's owner on the host",
    _sharer_maps_ids,
)
def _test_world(req: Requirements, params: Mapping[str, object]) -> str | None:
    from .networld import World

    return World.available()


TEST_WORLD = HostRequirement(
    "test-network",
    "the suite can make its own 'outside world' (networld.World: a network namespace and a "
    "veth pair to one TEST-NET-3 address): root and iproute2",
    _test_world,
    strict=True,
)


def _layer_whiteouts(req: Requirements, params: Mapping[str, object]) -> str | None:
    if params.get("strategy") != "layers" or os.geteuid() == 0:
        return None
    return (
        "the 'layers' rootfs strategy stores an image's whiteouts as char devices 0/0 (what "
        "overlayfs reads), and only root can make them: run the suite as root"
    )


LAYER_WHITEOUTS = HostRequirement(
    "layer-whiteouts",
    "an image whose layers delete files can be unpacked for the test's rootfs strategy "
    "('layers': boxlite runs as root on the host)",
    _layer_whiteouts,
)
#: every named host requirement a test may carry, by name
HOST_REQUIREMENTS: dict[str, HostRequirement] = {
    r.name: r for r in (SHARES_FROM_HERE, SHARER_SERVES, AUTO_IDMAP, TEST_WORLD, LAYER_WHITEOUTS)
}
