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
