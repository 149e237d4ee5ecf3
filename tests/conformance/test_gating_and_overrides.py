"""Capability gates skip with the capability's name; VM tiers skip (or fail under strict) on
an unavailable backend; a vendor overrides one test by subclassing; a bad name is loud."""

from __future__ import annotations


def test_undeclared_capability_skips_with_its_name(run_suite) -> None:
    run = run_suite("double-good")  # declares 9p and qcow2, not virtiofs; cannot boot
    skipped = run.messages("skipped")
    assert skipped["TestVolumes::test_host_files_are_visible[virtiofs]"] == (
        "backend 'double-good' does not declare capability 'virtiofs'"
    )
    assert skipped["TestPlanContract::test_plan_follows_share_read_only[virtiofs]"] == (
        "backend 'double-good' does not declare capability 'virtiofs'"
    )
    assert skipped["TestPauseResume::test_a_paused_box_runs_nothing_until_resumed"] == (
        "backend 'double-good' does not declare capability 'pause'"
    )
    # declared capability, but the backend cannot run here: the probe's reason and fix
    assert skipped["TestVolumes::test_host_files_are_visible[9p]"] == (
        "backend 'double-good' is not available on this host: "
        "a test double cannot boot VMs (fix: use qemu)"
    )
    assert run.report["verdict"] == "pass", run.output
    assert "| T2 | virtiofs | no | 0 | 0 |" in run.markdown


def test_strict_fails_vm_tiers_on_an_unavailable_backend(run_suite) -> None:
    run = run_suite("double-good", "--conformance-strict", "--conformance-max-tier", "1")
    assert run.proc.returncode == 1
    errors = run.names("error")
    assert "TestExec::test_echo" in errors, run.output
    assert "[--conformance-strict]" in run.messages("error")["TestExec::test_echo"]
    assert run.report["verdict"] == "fail"


def test_max_tier_deselects_higher_tiers(run_suite) -> None:
    run = run_suite("double-good", "--conformance-max-tier", "0")
    assert {t["tier"] for t in run.report["tests"]} == {0}
    assert "collected" in run.output and "deselected" in run.output


def test_vendor_overrides_one_test_by_subclassing(run_suite) -> None:
    module = """\
import pytest
from boxlite_conformance.suite import *  # noqa: F403


class TestPlanContract(TestPlanContract):  # noqa: F405
    def test_plan_is_deterministic(self, backend, tmp_path):
        pytest.skip("our VMM needs a fresh uuid per launch; tracked in VENDOR-12")
"""
    run = run_suite("double-nondeterministic", "--conformance-max-tier", "0", test_module=module)
    assert run.proc.returncode == 0, run.output
    assert run.messages("skipped")["TestPlanContract::test_plan_is_deterministic"] == (
        "our VMM needs a fresh uuid per launch; tracked in VENDOR-12"
    )
    # the rest of the class still runs
    assert "TestPlanContract::test_plan_is_json_serialisable" in run.names("passed")


def test_unknown_backend_name_errors_naming_the_registered_ones(run_suite) -> None:
    run = run_suite("no-such-backend", "--conformance-max-tier", "0")
    assert run.proc.returncode == 1
    assert "no VMM backend named 'no-such-backend'" in run.output
    assert "double-good" in run.output  # the message lists what is registered
    assert run.report["verdict"] == "fail"


def test_host_requirements_are_named_with_their_reason() -> None:
    """'auto-idmap' and 'sharer-on-host' are named gates, not capabilities: the reason says
    which requirement, which sharer, and why; a sharer that meets them opens the gate."""
    from boxlite_conformance.requirements import (
        AUTO_IDMAP,
        HOST_REQUIREMENTS,
        LAYER_WHITEOUTS,
        SHARER_SERVES,
        SHARES_FROM_HERE,
        TEST_WORLD,
        Requirements,
    )
    from boxlite_core.errors import ToolMissingError
    from boxlite_core.plugins import PluginRegistry
    from boxlite_core.vmm.spec import Capability

    assert set(HOST_REQUIREMENTS) == {
        AUTO_IDMAP.name,
        SHARER_SERVES.name,
        TEST_WORLD.name,
        LAYER_WHITEOUTS.name,
        SHARES_FROM_HERE.name,
    }
    assert SHARER_SERVES.strict and TEST_WORLD.strict and not AUTO_IDMAP.strict
    # a backend that runs boxes elsewhere closes the share tests, not as a failure
    assert not SHARES_FROM_HERE.strict
    far = Requirements("b", frozenset(), PluginRegistry(load_entry_points=False),
                       remote_host="qemu+ssh://h/system")
    assert "runs boxes on qemu+ssh://h/system" in str(far.host_unmet("shares-from-here", {}))
    assert Requirements("b", frozenset()).host_unmet("shares-from-here", {}) is None
    caps = frozenset({Capability.NINEP, Capability.VIRTIOFS})
    req = Requirements("b", caps, PluginRegistry(load_entry_points=False))
    reason = req.host_unmet("auto-idmap", {"sharer": "9p"})
    assert reason is not None and reason.startswith("host requirement 'auto-idmap' not met: ")
    assert "'9p'" in reason
    assert req.host_unmet("auto-idmap", {"sharer": "virtiofs"}) is None
    assert req.host_unmet("sharer-on-host", {"sharer": "9p"}) is None  # nothing to install

    def no_daemon() -> None:
        raise ToolMissingError("virtiofsd", "qemu-system-common", "share dirs")

    class NoDaemon(Requirements):
        def sharer(self, name):  # a host without virtiofsd
            sharer = super().sharer(name)
            sharer.check = no_daemon
            return sharer

    missing = NoDaemon("b", caps, PluginRegistry(load_entry_points=False))
    reason = missing.host_unmet("sharer-on-host", {"sharer": "virtiofs"})
    assert reason is not None
    assert "capability 'virtiofs' declared, but this host cannot serve a virtiofs share" in reason
    assert "apt-get install qemu-system-common" in reason


def test_a_declared_limitation_is_expected_to_fail_and_a_stale_one_fails(run_suite) -> None:
    """Issue 17 item 7: a test ``limited_by`` a limitation its sharer declares (9p:
    open-unlinked-fd) runs as a strict xfail on AssertionError — reported "limited" with the
    declaration when it fails, a failure when it passes (the declaration is stale) or when
    it breaks some other way; for a sharer that declares nothing it is an ordinary test."""
    module = """\
import pytest
from boxlite_conformance.markers import limited_by, tier
from boxlite_core.volumes.base import OPEN_UNLINKED_FD


@tier(0)
@pytest.mark.parametrize("sharer", ["9p", "virtiofs"])
class TestLimited:
    @limited_by(OPEN_UNLINKED_FD)
    def test_fails_where_declared(self, sharer):
        assert sharer != "9p", "ftruncate on an unlinked file: ENOENT"

    @limited_by(OPEN_UNLINKED_FD)
    def test_stale_declaration(self, sharer):
        pass

    @limited_by(OPEN_UNLINKED_FD)
    def test_other_errors_still_fail(self, sharer):
        raise RuntimeError("the box did not start")
"""
    run = run_suite("double-good", "--conformance-max-tier", "0", test_module=module)
    outcomes = run.outcomes()
    assert outcomes == {
        "TestLimited::test_fails_where_declared[9p]": "limited",
        "TestLimited::test_fails_where_declared[virtiofs]": "passed",
        "TestLimited::test_stale_declaration[9p]": "failed",
        "TestLimited::test_stale_declaration[virtiofs]": "passed",
        "TestLimited::test_other_errors_still_fail[9p]": "failed",
        "TestLimited::test_other_errors_still_fail[virtiofs]": "failed",
    }, run.output
    limited = run.messages("limited")["TestLimited::test_fails_where_declared[9p]"]
    assert limited.startswith("declared limitation 'open-unlinked-fd' of volume sharer '9p': ")
    assert "XPASS(strict)" in run.messages("failed")["TestLimited::test_stale_declaration[9p]"]
    assert run.report["verdict"] == "fail" and run.proc.returncode == 1
    assert "## Declared limitations (failed as declared)" in run.markdown
