"""Tier 0: the backend contract, checked without booting anything.

What every backend owes the runtime before it may launch a VM: a stable name it is registered
under, honest capabilities, a typed agent channel (``channel_kind``/``channel_handshake``)
whose device it declares, a probe that explains itself, and a plan that is a pure,
deterministic, JSON-serialisable function of the spec — one that refuses share kinds the
backend has not declared instead of silently dropping them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.vmm.base import LaunchPlan, VmmBackend
from boxlite_core.vmm.spec import Capability, ChannelKind, Handshake, ProbeResult, VmSpec

from ..markers import requires, tier
from ..specs import BOGUS_SHARE_KIND, KNOWN_SHARE_KINDS, build_spec, share, tree_snapshot

__all__ = ["TestAttachContract", "TestBackendIdentity", "TestPlanContract", "TestProbeContract"]

_SHARE_PARAMS = [
    pytest.param(kind, marks=requires(cap), id=kind) for kind, cap in KNOWN_SHARE_KINDS.items()
]


def _spec(root: Path, backend: VmmBackend, **kwargs) -> VmSpec:
    caps = frozenset(c for c in backend.capabilities() if isinstance(c, Capability))
    return build_spec(
        root,
        channel_kind=type(backend).channel_kind,
        channel_handshake=type(backend).channel_handshake,
        capabilities=caps,
        **kwargs,
    )


def _plan_json(backend: VmmBackend, spec: VmSpec) -> str:
    plan = backend.plan(spec)
    assert isinstance(plan, LaunchPlan), (
        f"plan() returned {type(plan).__name__}, not a boxlite_core.vmm.base.LaunchPlan"
    )
    return plan.to_json()


@tier(0)
class TestBackendIdentity:
    def test_name_is_non_empty(self, backend: VmmBackend) -> None:
        assert isinstance(backend.name, str) and backend.name.strip(), (
            f"{type(backend).__name__}.name must be a non-empty str, got {backend.name!r}"
        )

    def test_registered_under_its_name(self, backend: VmmBackend, backend_name: str) -> None:
        assert backend.name == backend_name, (
            f"backend registered as {backend_name!r} calls itself {backend.name!r}; "
            "register(name, factory) must use the class's `name`"
        )

    def test_capabilities_is_frozenset_of_capability(self, backend: VmmBackend) -> None:
        caps = backend.capabilities()
        assert isinstance(caps, frozenset), (
            f"capabilities() returned {type(caps).__name__}, not a frozenset"
        )
        wrong = [c for c in caps if not isinstance(c, Capability)]
        assert not wrong, f"capabilities() holds non-Capability members: {wrong!r}"

    def test_capabilities_are_stable(self, backend: VmmBackend) -> None:
        assert backend.capabilities() == backend.capabilities(), (
            "capabilities() must not change between calls"
        )

    def test_channel_kind_and_handshake_are_typed(self, backend: VmmBackend) -> None:
        """The core builds ``spec.agent`` from these two class attributes; a plain string
        (or the old ``agent_kind`` property) would reach the channel code untyped."""
        kind = type(backend).channel_kind
        handshake = type(backend).channel_handshake
        assert isinstance(kind, ChannelKind), (
            f"{type(backend).__name__}.channel_kind must be a boxlite_core.vendor.ChannelKind "
            f"(VIRTIO_SERIAL or VSOCK), got {kind!r}"
        )
        assert isinstance(handshake, Handshake), (
            f"{type(backend).__name__}.channel_handshake must be a boxlite_core.vendor."
            f"Handshake (NONE or FIRECRACKER_CONNECT), got {handshake!r}"
        )
        if kind is ChannelKind.VIRTIO_SERIAL:
            assert handshake is Handshake.NONE, (
                f"a virtio-serial channel takes no handshake, got {handshake.value!r}: "
                "a handshake is said on a vsock stream"
            )

    def test_channel_kind_is_a_declared_capability(self, backend: VmmBackend) -> None:
        """The channel device is a device capability like any other: a backend whose agent
        channel is vsock declares 'vsock', a virtio-serial one 'virtio-serial'."""
        kind = type(backend).channel_kind
        if not isinstance(kind, ChannelKind):
            pytest.fail(f"channel_kind is {kind!r}, not a ChannelKind (see the test above)")
        wanted = Capability(kind.value)
        assert wanted in backend.capabilities(), (
            f"channel_kind is {kind.value!r} but capabilities() lacks Capability."
            f"{wanted.name}: declare the device the agent channel uses"
        )


@tier(0)
class TestProbeContract:
    def test_probe_returns_probe_result(self, backend: VmmBackend) -> None:
        result = backend.probe()
        assert isinstance(result, ProbeResult), (
            f"probe() returned {type(result).__name__}, not a boxlite_core.vmm.spec.ProbeResult"
        )

    def test_unavailable_probe_says_why_and_how_to_fix(self, backend: VmmBackend) -> None:
        result = backend.probe()
        assert isinstance(result, ProbeResult), "probe() must return a ProbeResult"
        if result.available:
            return
        assert result.reason.strip(), "an unavailable probe must give a reason"
        assert result.fix.strip(), (
            f"probe() says unavailable ({result.reason!r}) but gives no fix for the user"
        )

    def test_probe_is_json_serialisable(self, backend: VmmBackend) -> None:
        result = backend.probe()
        assert isinstance(result, ProbeResult), "probe() must return a ProbeResult"
        json.dumps(result.to_dict())

    def test_probe_is_repeatable(self, backend: VmmBackend) -> None:
        first, second = backend.probe(), backend.probe()
        assert getattr(first, "available", None) == getattr(second, "available", None), (
            "two probes in a row disagree on availability"
        )


@tier(0)
class TestPlanContract:
    def test_plan_is_a_launch_plan_for_the_spec(
        self, backend: VmmBackend, tmp_path: Path
    ) -> None:
        spec = _spec(tmp_path, backend)
        plan = backend.plan(spec)
        assert isinstance(plan, LaunchPlan)
        assert plan.backend == backend.name, (
            f"plan.backend is {plan.backend!r}, the backend is {backend.name!r}"
        )
        assert plan.spec == spec, "plan.spec must be the spec it was planned from"

    def test_plan_is_json_serialisable(self, backend: VmmBackend, tmp_path: Path) -> None:
        text = _plan_json(backend, _spec(tmp_path, backend))
        data = json.loads(text)
        assert data["backend"] == backend.name
        assert data["data"], "plan.data is empty: it must hold what launch() executes"

    def test_plan_is_deterministic(self, backend: VmmBackend, tmp_path: Path) -> None:
        first = _plan_json(backend, _spec(tmp_path, backend))
        second = _plan_json(backend, _spec(tmp_path, backend))  # equal spec, new objects
        assert first == second, "same spec, different plan: plan() must be deterministic"

    def test_plan_does_not_touch_the_filesystem(
        self, backend: VmmBackend, tmp_path: Path
    ) -> None:
        spec = _spec(tmp_path, backend)
        before = tree_snapshot(tmp_path)
        backend.plan(spec)
        assert tree_snapshot(tmp_path) == before, (
            "plan() created or changed files; it must be pure (launch() does the work)"
        )

    @pytest.mark.parametrize(
        ("field", "low", "high"), [("cpus", 1, 2), ("memory_mib", 256, 512)]
    )
    def test_plan_follows_resources(
        self, backend: VmmBackend, tmp_path: Path, field: str, low: int, high: int
    ) -> None:
        a = json.loads(_plan_json(backend, _spec(tmp_path, backend, **{field: low})))
        b = json.loads(_plan_json(backend, _spec(tmp_path, backend, **{field: high})))
        assert a["data"] != b["data"], (
            f"plan.data is the same for {field}={low} and {field}={high}: it ignores {field}"
        )

    def test_plan_follows_disk_read_only(self, backend: VmmBackend, tmp_path: Path) -> None:
        rw = _spec(tmp_path, backend, disk_read_only=False)
        if not rw.disks:
            pytest.skip(
                f"no disk to check: backend {backend.name!r} declares neither capability "
                "'qcow2' nor 'raw'"
            )
        ro = _spec(tmp_path, backend, disk_read_only=True)
        assert json.loads(_plan_json(backend, rw))["data"] != json.loads(
            _plan_json(backend, ro)
        )["data"], "plan.data is the same for a read-only and a writable disk"

    @pytest.mark.parametrize("kind", _SHARE_PARAMS)
    def test_plan_attaches_declared_share(
        self, backend: VmmBackend, tmp_path: Path, kind: str
    ) -> None:
        without = json.loads(_plan_json(backend, _spec(tmp_path, backend)))["data"]
        spec = _spec(tmp_path, backend, shares=[share(tmp_path, kind, "vol0")])
        data = json.loads(_plan_json(backend, spec))["data"]
        assert data != without, f"a {kind} share left plan.data unchanged: it was dropped"
        assert "vol0" in json.dumps(data), f"the {kind} share's tag 'vol0' is not in plan.data"

    @pytest.mark.parametrize("kind", _SHARE_PARAMS)
    def test_plan_follows_share_read_only(
        self, backend: VmmBackend, tmp_path: Path, kind: str
    ) -> None:
        rw = _spec(tmp_path, backend, shares=[share(tmp_path, kind, "vol0", read_only=False)])
        ro = _spec(tmp_path, backend, shares=[share(tmp_path, kind, "vol0", read_only=True)])
        rw_data = json.loads(_plan_json(backend, rw))["data"]
        ro_data = json.loads(_plan_json(backend, ro))["data"]
        if kind == "virtiofs" and rw_data == ro_data:
            # virtiofs read-only is enforced by the sharer's daemon, not the device
            pytest.skip(
                "capability 'virtiofs': read-only is enforced by the virtiofs sharer "
                "(virtiofsd), not by the backend's device, so an equal plan is correct here; "
                "T2 TestVolumes checks the guest cannot write"
            )
        assert rw_data != ro_data, (
            f"plan.data is the same for a read-only and a writable {kind} share: "
            "read_only is ignored, so the guest could write to a read-only volume"
        )

    @pytest.mark.parametrize("kind", [*KNOWN_SHARE_KINDS, BOGUS_SHARE_KIND])
    def test_plan_refuses_undeclared_share_kind(
        self, backend: VmmBackend, tmp_path: Path, kind: str
    ) -> None:
        cap = KNOWN_SHARE_KINDS.get(kind)
        if cap is not None and cap in backend.capabilities():
            pytest.skip(
                f"{cap.value} is declared: refusing a {kind} share is not expected; "
                "test_plan_attaches_declared_share covers it"
            )
        spec = _spec(tmp_path, backend, shares=[share(tmp_path, kind, "vol0")])
        with pytest.raises(ConfigError):
            backend.plan(spec)


@tier(0)
class TestAttachContract:
    def test_attach_empty_dir_returns_none(self, backend: VmmBackend, tmp_path: Path) -> None:
        assert backend.attach(tmp_path) is None, (
            "attach() of a box directory that never launched a VM must return None"
        )

    def test_attach_does_not_create_files(self, backend: VmmBackend, tmp_path: Path) -> None:
        backend.attach(tmp_path)
        assert not list(tmp_path.iterdir()), "attach() of an empty box directory wrote files"
