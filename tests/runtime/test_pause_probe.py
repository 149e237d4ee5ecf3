"""Probe once per start, and the Paused state's transitions — without a VM.

The VM handle here is a double whose liveness the test controls: the runtime code under test
(lifecycle, link, recovery) is real; only the hypervisor is replaced.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError, EngineError, StateError
from boxlite_core.hookspecs import hookimpl
from boxlite_core.models import BoxStatus
from boxlite_core.plugins import PluginRegistry
from boxlite_core.runtime.runtime import Runtime
from boxlite_core.vmm.base import VmHandle
from boxlite_core.vmm.spec import Capability, ProbeResult
from boxlite_testing import runtime_doubles as doubles
from boxlite_testing.runtime_doubles import TINY, kit_double, opts

PROBES: list[str] = []
#: box directory -> the live VM double in it (what the backend's attach finds)
VMS: dict[Path, HandleDouble] = {}


class HandleDouble(VmHandle):
    """A "VM" that runs until stopped or killed; records pause/resume calls."""

    def __init__(self) -> None:
        self.running = True
        self.calls: list[str] = []

    @property
    def pid(self) -> int | None:
        return None

    def is_running(self) -> bool:
        return self.running

    def wait(self, timeout: float | None = None) -> bool:
        return not self.running

    def stop(self, timeout: float = 10.0) -> None:
        self.calls.append("stop")
        self.running = False

    def kill(self) -> None:
        self.calls.append("kill")
        self.running = False

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def exit_reason(self) -> str | None:
        return None if self.running else "killed by the test"


class CountingBackendDouble(doubles.LaunchFailBackendDouble):
    """Counts its probes; declares PAUSE; attach() finds the test's VM double."""

    name = "counting_double"

    def capabilities(self) -> frozenset[Capability]:
        return super().capabilities() | {Capability.PAUSE}

    def probe(self) -> ProbeResult:
        PROBES.append(self.name)
        return ProbeResult(True, reason="test double")

    def attach(self, box_dir: Path) -> VmHandle | None:
        vm = VMS.get(Path(box_dir))
        return vm if vm is not None and vm.running else None


class CountingPlugin:
    @hookimpl
    def boxlite_register_vmm_backends(self, register):
        register("counting_double", CountingBackendDouble)


def _runtime(tmp_path: Path) -> Runtime:
    registry = PluginRegistry(
        load_entry_points=False,
        extra_plugins=[("doubles", doubles.Plugin()), ("counting", CountingPlugin())],
    )
    return Runtime(tmp_path / "home", plugins=registry, kit_provider=kit_double(tmp_path / "kit"))


@pytest.fixture
def prt(tmp_path):
    PROBES.clear()
    VMS.clear()
    runtime = _runtime(tmp_path)
    layout = doubles.make_oci_layout(tmp_path / "layout", {"bin/hello": b"hi\n"},
                                     {"Cmd": ["/bin/hello"]})
    runtime.images.import_path(layout, name=TINY)
    yield runtime
    runtime.close()


def test_a_run_probes_each_backend_once(prt):
    """create (no --backend: every backend is probed to choose) then start: one probe each."""
    box = prt.create(opts(backend=None))
    assert box.record.backend == "counting_double"  # the selection hook's pick among the doubles
    with pytest.raises(EngineError, match="start failed in vmm_spawn"):
        box.start()
    assert PROBES == ["counting_double"]


def _running(rt: Runtime, name: str) -> tuple[str, HandleDouble]:
    """A box whose record says Running with a live VM double behind it."""
    box = rt.create(opts(backend="counting_double", name=name))
    rt.store.set_status(box.id, BoxStatus.STARTING)
    rt.store.set_status(box.id, BoxStatus.RUNNING)
    vm = VMS[rt.box_dir(box.id)] = HandleDouble()
    return box.id, vm


def test_pause_and_resume_move_the_record(prt):
    box_id, vm = _running(prt, "frozen")
    box = prt.get(box_id)
    box.pause()
    assert box.status is BoxStatus.PAUSED and vm.calls == ["pause"]
    assert box.info()["status"] == "paused"
    assert [r.status for r in prt.list(all=False)] == [BoxStatus.PAUSED]
    box.pause()  # already paused: nothing to do
    assert vm.calls == ["pause"]
    with pytest.raises(StateError, match=r"frozen is paused.*`boxlite resume frozen`"):
        box.exec(["true"])
    with pytest.raises(StateError, match=r"`boxlite resume frozen`"):
        box.start()
    box.resume()
    assert box.status is BoxStatus.RUNNING and vm.calls == ["pause", "resume"]
    box.resume()  # running: nothing to do
    assert vm.calls == ["pause", "resume"]


def test_resume_of_a_box_that_is_not_paused_is_a_state_error(prt):
    box = prt.create(opts(backend="counting_double"))
    with pytest.raises(StateError, match="configured, not paused"):
        box.resume()
    with pytest.raises(StateError, match="configured, not running"):
        box.pause()


def test_stop_and_kill_from_paused(prt):
    box_id, vm = _running(prt, "stopme")
    box = prt.get(box_id)
    box.pause()
    box.stop(timeout=0)
    assert vm.calls[:2] == ["pause", "resume"]  # resumed so the guest could shut down
    assert box.status is BoxStatus.STOPPED and not vm.running
    other_id, other_vm = _running(prt, "killme")
    other = prt.get(other_id)
    other.pause()
    other.kill()
    assert other.status is BoxStatus.STOPPED and not other_vm.running
    assert other.record.state["stop_reason"] == "killed on request"


def test_remove_of_a_paused_box_needs_force(prt):
    box_id, vm = _running(prt, "rmme")
    prt.get(box_id).pause()
    with pytest.raises(StateError, match="rmme is paused; stop it first"):
        prt.remove("rmme")
    prt.remove("rmme", force=True)
    assert prt.store.find(box_id) is None and not vm.running


def test_recovery_fails_a_paused_box_whose_vm_died(tmp_path, prt):
    box_id, vm = _running(prt, "lost")
    prt.get(box_id).pause()
    vm.running = False  # the VM died while paused and nobody watched
    again = _runtime(tmp_path)
    try:
        record = again.store.get(box_id)
        assert record.status is BoxStatus.FAILED
        assert record.error == "VM is gone (found at startup)"
        assert "was paused" in record.state["stop_reason"]
    finally:
        again.close()


def test_pause_on_a_backend_without_pause_is_refused_before_the_state_is_read(prt):
    box = prt.create(opts(backend="launchfail_double"))
    with pytest.raises(ConfigError, match="cannot pause"):
        box.pause()
