"""The suite can fail: each broken backend double fails exactly the test named for its fault,
and a correct double passes everything it is held to."""

from __future__ import annotations

import pytest

T0 = ("--conformance-max-tier", "0")


def test_good_double_passes_tier0(run_suite) -> None:
    run = run_suite("double-good", *T0)
    assert run.proc.returncode == 0, run.output
    assert run.report["verdict"] == "pass"
    assert not run.names("failed") and not run.names("error")
    assert "TestPlanContract::test_plan_is_deterministic" in run.names("passed")
    assert "TestPlanContract::test_plan_follows_share_read_only[9p]" in run.names("passed")


@pytest.mark.parametrize(
    ("backend", "expected_failures"),
    [
        ("double-nondeterministic", {"TestPlanContract::test_plan_is_deterministic"}),
        ("double-ro-ignored", {"TestPlanContract::test_plan_follows_share_read_only[9p]"}),
        (
            "double-bad-probe",
            {
                "TestProbeContract::test_probe_returns_probe_result",
                "TestProbeContract::test_unavailable_probe_says_why_and_how_to_fix",
                "TestProbeContract::test_probe_is_json_serialisable",
            },
        ),
    ],
)
def test_broken_double_fails_the_named_tests(
    run_suite, backend: str, expected_failures: set[str]
) -> None:
    run = run_suite(backend, *T0)
    assert run.proc.returncode == 1, run.output
    assert run.report["verdict"] == "fail"
    assert run.names("failed") == expected_failures, run.output
    assert not run.names("error"), run.output
    for name in expected_failures:
        assert f"`{name}`" in run.markdown, "the Markdown report must list each failure"
    assert "| T0 | core |" in run.markdown


def test_failure_messages_explain_the_fault(run_suite) -> None:
    ro = run_suite("double-ro-ignored", *T0).messages("failed")
    assert "read_only is ignored" in ro["TestPlanContract::test_plan_follows_share_read_only[9p]"]
    nd = run_suite("double-nondeterministic", *T0).messages("failed")
    assert "deterministic" in nd["TestPlanContract::test_plan_is_deterministic"]


#: the VM-tier tests the qemu doubles break, run alone (each boots one VM under TCG)
RO_9P = "TestVolumes::test_read_only_holds_when_guest_root_remounts_it_writable[9p]"
PAUSE = "TestPauseResume::test_a_paused_box_runs_nothing_until_resumed"
RO_TESTS = "test_read_only and 9p"
PAUSE_TESTS = "test_a_paused_box"


@pytest.mark.vm
def test_real_qemu_under_a_double_name_passes_the_vm_tests_the_doubles_break(run_suite) -> None:
    """The control: without the fault, the same tests pass through the same harness (and the
    VM tiers make their boxes through the vendor's ``boxlite_registry``)."""
    run = run_suite(
        "double-qemu",
        "--conformance-strict",
        "-k",
        f"{RO_TESTS} or {PAUSE_TESTS}",
        shared_home=True,
    )
    assert run.proc.returncode == 0, run.output
    assert {RO_9P, PAUSE} <= run.names("passed"), run.output


@pytest.mark.vm
@pytest.mark.parametrize(
    ("backend", "selection", "broken", "why"),
    [
        ("double-qemu-ro-ignored", RO_TESTS, RO_9P, "only enforced inside the guest"),
        ("double-qemu-pause-ignored", PAUSE_TESTS, PAUSE, "pause() did not stop the guest"),
    ],
)
def test_a_real_vm_with_one_fault_fails_the_named_vm_test(
    run_suite, backend: str, selection: str, broken: str, why: str
) -> None:
    run = run_suite(backend, "--conformance-strict", "-k", selection, shared_home=True)
    assert run.proc.returncode == 1, run.output
    assert broken in run.names("failed"), run.output
    assert why in run.messages("failed")[broken], run.messages("failed")[broken]
    assert run.names("failed") == {broken}, "the fault must fail only the test named for it"
