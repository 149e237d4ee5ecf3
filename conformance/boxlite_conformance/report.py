"""The run's report: JSON per backend (every test's tier, capability, outcome, duration) and a
Markdown backend x capability table, plus the combined table for ``--backend all``.

The verdict is computed here, once, so the CLI's exit code and the table always agree: a
backend fails when any test fails or errors. Tests closed by an undeclared capability are
skipped, never failed, so declaring less is allowed — declaring and not delivering is not.
A test a volume sharer's declared limitation expects to fail, and that does, is "limited":
neither a pass nor a failure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from boxlite_core.vmm.spec import Capability, CapabilityGroup

CORE = "core"  # the column for tests that need no capability
FAILING = ("failed", "error")


def build(
    *,
    backend: str,
    plugin: str | None,
    capabilities: list[str] | None,
    probe: Mapping[str, Any] | None,
    plugin_failures: list[dict[str, str]],
    tests: list[dict[str, Any]],
    duration: float,
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    failed = [t for t in tests if t["outcome"] in FAILING]
    return {
        "backend": backend,
        "plugin": plugin,
        "capabilities": capabilities,
        "probe": dict(probe) if probe is not None else None,
        "plugin_failures": plugin_failures,
        "summary": counts,
        "verdict": "fail" if failed or not tests else "pass",
        "duration": round(duration, 2),
        "tests": sorted(tests, key=lambda t: (t["tier"], t["nodeid"])),
    }


def cells(data: Mapping[str, Any]) -> dict[tuple[int, str], dict[str, int]]:
    """(tier, capability) → outcome counts; a test needing several capabilities counts in each."""
    out: dict[tuple[int, str], dict[str, int]] = {}
    for test in data["tests"]:
        for cap in test["capabilities"] or [CORE]:
            bucket = out.setdefault((test["tier"], cap), {})
            bucket[test["outcome"]] = bucket.get(test["outcome"], 0) + 1
    return out


def verdict_of(counts: Mapping[str, int]) -> str:
    if any(counts.get(o) for o in FAILING):
        return "FAIL"
    if counts.get("passed"):
        return "pass"
    if counts.get("limited"):
        return "limited"
    if counts.get("skipped"):
        return "skip"
    return "—"


def group_of(name: str) -> str:
    """The capability's group ("devices", "operations", "acceleration"); "" for the core
    column or a name this core does not know."""
    try:
        return Capability(name).group.value
    except ValueError:
        return ""


def grouped(names: Iterable[str]) -> str:
    """``devices: 9p, raw; operations: attach`` — names in group order, unknown ones last."""
    names = set(names)
    parts = []
    for group in CapabilityGroup:
        members = [c.value for c in Capability if c.group is group and c.value in names]
        if members:
            parts.append(f"{group.value}: {', '.join(members)}")
    other = sorted(n for n in names if not group_of(n))
    if other:
        parts.append(f"other: {', '.join(other)}")
    return "; ".join(parts)


def _cap_order(names: Iterable[str]) -> list[str]:
    known = [c.value for c in Capability]
    return sorted(set(names), key=lambda n: (n != CORE, known.index(n) if n in known else 99, n))


def markdown(data: Mapping[str, Any]) -> str:
    declared = set(data.get("capabilities") or [])
    probe = data.get("probe") or {}
    lines = [
        f"# Conformance: backend `{data['backend']}`",
        "",
        f"- verdict: **{data['verdict'].upper()}**",
        f"- plugin: `{data.get('plugin')}`",
        f"- declared capabilities: {grouped(declared) or '(none)'}",
    ]
    if probe:
        state = "available" if probe.get("available") else f"unavailable — {probe.get('reason')}"
        if probe.get("fix"):
            state += f" (fix: {probe['fix']})"
        lines.append(f"- probe: {state}")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(data["summary"].items()))
    lines += [f"- tests: {summary or 'none'} in {data['duration']}s", ""]
    lines += [
        "| tier | capability | declared | passed | failed | skipped | result | group |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = cells(data)
    for tier in sorted({t for t, _ in table}):
        for cap in _cap_order(c for t, c in table if t == tier):
            counts = table[(tier, cap)]
            is_declared = "—" if cap == CORE else ("yes" if cap in declared else "no")
            bad = counts.get("failed", 0) + counts.get("error", 0)
            lines.append(
                f"| T{tier} | {cap} | {is_declared} | {counts.get('passed', 0)} | {bad} | "
                f"{counts.get('skipped', 0)} | {verdict_of(counts)} | {group_of(cap) or '—'} |"
            )
    failures = [t for t in data["tests"] if t["outcome"] in FAILING]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- T{t['tier']} `{t['test']}`: {t['message']}" for t in failures]
    limited = [t for t in data["tests"] if t["outcome"] == "limited"]
    if limited:
        lines += ["", "## Declared limitations (failed as declared)", ""]
        lines += [f"- T{t['tier']} `{t['test']}`: {t['message']}" for t in limited]
    skips: dict[str, int] = {}
    for t in data["tests"]:
        if t["outcome"] == "skipped":
            skips[t["message"]] = skips.get(t["message"], 0) + 1
    if skips:
        lines += ["", "## Skip reasons", ""]
        lines += [f"- {n} x {reason}" for reason, n in sorted(skips.items())]
    return "\n".join(lines) + "\n"


def write(directory: Path, data: Mapping[str, Any]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stem = _safe(data["backend"])
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown(data))
    return json_path, md_path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "backend"


def combined_markdown(
    reports: list[Mapping[str, Any]], plugin_failures: Iterable[Mapping[str, str]] = ()
) -> str:
    """One row per backend, one column per tier and per capability seen in any report."""
    caps = _cap_order(
        c for r in reports for (_t, c) in cells(r) if c != CORE
    )
    tiers = sorted({t for r in reports for (t, _c) in cells(r)})
    head = ["backend", "verdict", *[f"T{t}" for t in tiers], *caps]
    lines = [
        "# Conformance: all backends",
        "",
        "Cells: pass / FAIL / skip (closed: capability not declared, or backend unavailable "
        "here) / — (no test).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in sorted(reports, key=lambda r: r["backend"]):
        table = cells(r)
        row = [f"`{r['backend']}`", r["verdict"].upper()]
        for t in tiers:
            merged: dict[str, int] = {}
            for (tt, _c), counts in table.items():
                if tt == t:
                    for k, v in counts.items():
                        merged[k] = merged.get(k, 0) + v
            row.append(verdict_of(merged))
        for cap in caps:
            merged = {}
            for (_t, cc), counts in table.items():
                if cc == cap:
                    for k, v in counts.items():
                        merged[k] = merged.get(k, 0) + v
            row.append(verdict_of(merged))
        lines.append("| " + " | ".join(row) + " |")
    broken = list(plugin_failures)
    if broken:
        lines += ["", "## Plugins that failed to load (their backends were not tested)", ""]
        lines += [f"- `{f['plugin']}` in {f['where']}: {f['error']}" for f in broken]
    for r in reports:
        bad = [t for t in r["tests"] if t["outcome"] in FAILING]
        if bad:
            lines += ["", f"## `{r['backend']}` failures", ""]
            lines += [f"- T{t['tier']} `{t['test']}`: {t['message']}" for t in bad]
    return "\n".join(lines) + "\n"
